/**
 * A module's import graph as `deno info --json` reports it, split the way
 * the runtime loads it: modules loaded with the root (static imports,
 * followed), and the targets of dynamic `import()`s met on the way (loaded
 * only when that code runs; not followed).
 * @module
 */
import assert from "node:assert/strict";

/** `root` (a path relative to `base`, a test's `import.meta.url`): its static modules and dynamic targets. */
export async function moduleGraph(
  root: string,
  base: string,
): Promise<{ statics: Set<string>; dynamics: Set<string> }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", new URL(root, base).pathname],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  type Dep = { code?: { specifier: string }; isDynamic?: boolean };
  const graph = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    roots: string[];
    modules: { specifier: string; dependencies?: Dep[] }[];
  };
  const bySpecifier = new Map(graph.modules.map((m) => [m.specifier, m]));
  const statics = new Set<string>();
  const dynamics = new Set<string>();
  const stack = [...graph.roots];
  while (stack.length > 0) {
    const specifier = stack.pop()!;
    if (statics.has(specifier)) continue;
    statics.add(specifier);
    for (const dep of bySpecifier.get(specifier)?.dependencies ?? []) {
      if (!dep.code) continue; // type-only imports are erased
      if (dep.isDynamic) dynamics.add(dep.code.specifier);
      else stack.push(dep.code.specifier);
    }
  }
  return { statics, dynamics };
}
