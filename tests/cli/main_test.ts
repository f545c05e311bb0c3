import assert from "node:assert/strict";
import { blktap } from "../_helpers/tools.ts";
import { COMMANDS } from "../../src/cli/commands.ts";

Deno.test("blktap --help lists every command and exits 0", async () => {
  const result = await blktap(["--help"]);
  assert.equal(result.code, 0);
  assert.match(result.stdout, /usage: blktap COMMAND/);
  for (const command of COMMANDS) assert.match(result.stdout, new RegExp(`\\b${command.name}\\b`));
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
  await Promise.all(COMMANDS.map(async (command) => {
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
