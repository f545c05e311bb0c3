import assert from "node:assert/strict";
import { blktap } from "../_helpers/tools.ts";
import { moduleGraph } from "../_helpers/module_graph.ts";
import { COMMAND_NAMES, loadCommand, loadCommands } from "../../src/cli/commands.ts";

Deno.test("blktap --help lists every command and exits 0", async () => {
  const result = await blktap(["--help"]);
  assert.equal(result.code, 0);
  assert.match(result.stdout, /usage: blktap COMMAND/);
  for (const command of await loadCommands()) {
    assert.match(result.stdout, new RegExp(`\\b${command.name}\\b.*${escape(command.summary)}`));
  }
});

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

Deno.test("the command table names exactly the commands its modules define, in help order", async () => {
  const commands = await loadCommands();
  assert.deepEqual(commands.map((c) => c.name), COMMAND_NAMES);
  for (const name of COMMAND_NAMES) assert.equal((await loadCommand(name))?.name, name);
  assert.equal(await loadCommand("no-such-command"), undefined);
});

Deno.test("blktap loads a command's module only when it runs: convert needs neither ctrl, disk nor NBD", async () => {
  const main = (await moduleGraph("../../main.ts", import.meta.url)).statics;
  assert.ok([...main].some((m) => m.endsWith("/src/cli/commands.ts")), "the graph was read");
  // Helpers such as src/formats/size.ts are fine; no command, daemon, driver or FFI module.
  const daemon = /\/src\/(ctl|ring|frontends|disk|tools)\/|\/src\/formats\/[^/]+\/|\/ffi\//;
  assert.deepEqual(
    [...main].filter((m) => daemon.test(m)),
    [],
    "main.ts loads no command module up front",
  );
  const convert = (await moduleGraph("../../src/tools/convert.ts", import.meta.url)).statics;
  for (
    const m of ["ctl/ctrl_command.ts", "disk/disk_command.ts", "frontends/nbd/serve_command.ts"]
  ) {
    assert.ok(![...convert].some((s) => s.endsWith(m)), `convert loads ${m}`);
  }
});

Deno.test("blktap with no command or an unknown one prints usage to stderr and exits 2", async () => {
  for (const args of [[], ["no-such-command"]]) {
    const result = await blktap(args);
    assert.equal(result.code, 2, `blktap ${args.join(" ")}`);
    assert.equal(result.stdout, "");
    assert.match(result.stderr, /usage: blktap COMMAND/);
  }
});

Deno.test("every command answers --help with exit 0 and a bad option with exit 2", async () => {
  await Promise.all(COMMAND_NAMES.map(async (name) => {
    const command = { name };
    const help = await blktap([command.name, "--help"]);
    assert.equal(help.code, 0, `${command.name} --help`);
    assert.match(help.stdout, /usage:/i, `${command.name} --help shows usage`);
    const bad = await blktap([command.name, "--no-such-option"]);
    assert.equal(bad.code, 2, `${command.name} --no-such-option`);
    assert.match(bad.stderr, /no-such-option/);
    assert.equal(bad.stderr.trimEnd().split("\n").length, 1, `${command.name}: one line`);
  }));
});

Deno.test("the ./blktap that make builds runs (standalone or launcher)", async () => {
  const exe = new URL("../../blktap", import.meta.url).pathname;
  const stat = await Deno.stat(exe).catch(() => null);
  assert.ok(stat?.isFile, `${exe} is missing: run 'make' before the tests`);
  const out = await new Deno.Command(exe, { args: ["--version"], stdout: "piped" }).output();
  assert.equal(out.code, 0);
  assert.match(new TextDecoder().decode(out.stdout), /^blktap \d+\.\d+\.\d+/);
});

Deno.test("a negative or missing number for a numeric option is one clear line and exit 2", async () => {
  const cases: [string[], RegExp][] = [
    [["disk", "--minor", "-1"], /--minor expects a non-negative integer, got '-1'/],
    [["exercise", "0", "--requests", "-5"], /--requests expects a non-negative integer, got '-5'/],
    [
      ["create", "aio:/x", "--max-iops", "-1"],
      /--max-iops expects a non-negative integer, got '-1'/,
    ],
    [["create", "aio:/x", "--max-iops", "--json"], /option '--max-iops' needs a value/],
  ];
  for (const [args, message] of cases) {
    const result = await blktap([...args, "--run-dir", "/nonexistent"]);
    assert.equal(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
    const lines = result.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, `${args.join(" ")}: ${result.stderr}`);
    assert.match(lines[0], message);
    assert.match(
      lines[0],
      new RegExp(`^blktap ${args[0]}: .*\\(see 'blktap ${args[0]} --help'\\)$`),
    );
  }
});
