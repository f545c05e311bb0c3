/**
 * `blktap check IMAGE [--json] [--repair]`: runs the format's structural
 * check hook.
 *
 * Exit status: 0 clean (leaked clusters are reported but harmless),
 * 1 corrupt, 2 unusable — the image cannot be opened or checked at all,
 * including formats that have no check (raw): they are reported as "no
 * check for this format" with status 2, where `qemu-img check` says "This
 * image format does not support checks" and exits 63; we keep our three
 * statuses so that a script's "not 0" always means "not verified".
 * With `--repair` the image is checked again after repairing, and the
 * status is that of the second check.
 * @module
 */
import { type Command, parseCommandArgs } from "../cli/command.ts";
import type { CheckReport } from "../formats/inspect.ts";
import { formatEntry, parseImageSpec, probeFormat } from "../formats/open_image.ts";
import { describeChain } from "./image_chain.ts";

/** Exit statuses of `blktap check`. */
export const CHECK_CLEAN = 0;
export const CHECK_CORRUPT = 1;
export const CHECK_UNUSABLE = 2;

/** What `blktap check --json` prints. */
export interface CheckResult {
  filename: string;
  format: string;
  /** Final state (after repair when asked). */
  report: CheckReport;
  /** What the repair pass changed. */
  repaired?: string[];
  status: number;
}

/** Corruptions found (the count when the list was cut short). */
export function corruptionCount(report: CheckReport): number {
  return report.corruptionCount ?? report.corruptions.length;
}

function statusOf(report: CheckReport): number {
  if (report.unusable !== undefined) return CHECK_UNUSABLE;
  return corruptionCount(report) > 0 || (report.checkErrors ?? 0) > 0 ? CHECK_CORRUPT : CHECK_CLEAN;
}

/** Checks `spec` (`type:path` or a path); never throws for a bad image. */
export async function checkImage(spec: string, repair = false): Promise<CheckResult> {
  const { path, format: given } = parseImageSpec(spec);
  let format = given ?? "";
  try {
    format ||= await probeFormat(path);
  } catch (error) {
    const report = { corruptions: [], leakedClusters: 0, unusable: (error as Error).message };
    return { filename: path, format: "unknown", report, status: CHECK_UNUSABLE };
  }
  const entry = formatEntry(format)!;
  if (!entry.check) {
    const unusable = `${path}: no check for ${
      entry.name === "aio" || entry.name === "sync" ? "raw" : entry.name
    } images (this image format does not support checks)`;
    const report = { corruptions: [], leakedClusters: 0, unusable };
    return { filename: path, format: entry.name, report, status: CHECK_UNUSABLE };
  }
  let repaired: string[] | undefined;
  let report: CheckReport;
  try {
    // An image whose chain cannot be opened (a loop, a missing backing file)
    // is unusable however sound its own tables are: QEMU refuses to open it.
    await describeChain(`${format}:${path}`);
    if (repair) repaired = (await entry.check(path, { repair: true })).repaired ?? [];
    report = await entry.check(path, { repair: false });
  } catch (error) {
    report = { corruptions: [], leakedClusters: 0, unusable: (error as Error).message };
  }
  return { filename: path, format: entry.name, report, repaired, status: statusOf(report) };
}

/** The one-line verdict `check` says on stderr when the image is not clean. */
export function checkVerdict(result: CheckResult): string | undefined {
  const { report } = result;
  if (report.unusable !== undefined) {
    const why = report.unusable;
    return why.includes(result.filename) ? why : `${result.filename}: ${why}`;
  }
  const count = report.corruptions.length;
  if (count > 0) return `${result.filename}: corrupt (${count} error${count === 1 ? "" : "s"})`;
  return undefined;
}

/** `x` with two decimals as C's printf("%.2f") gives it (exact ties to even: 3.125 -> 3.12). */
function printfFixed2(x: number): string {
  const scaled = x * 100;
  const floor = Math.floor(scaled);
  if (scaled - floor === 0.5 && floor % 2 === 0) return (floor / 100).toFixed(2);
  return x.toFixed(2);
}

/** Text in the spirit of `qemu-img check`. */
export function formatCheckHuman(result: CheckResult): string {
  const { report } = result;
  const lines: string[] = [];
  for (const fix of result.repaired ?? []) lines.push(`Repaired: ${fix}`);
  if (report.unusable !== undefined) {
    lines.push(`${report.unusable}`);
    return lines.join("\n");
  }
  for (const c of report.corruptions) lines.push(`ERROR: ${c}`);
  const errors = corruptionCount(report);
  if (report.checkErrors) {
    lines.push(`\n${report.checkErrors} internal errors have occurred during the check.`);
  }
  if (errors > 0) {
    lines.push(`\n${errors} errors were found on ${result.filename}.`);
  } else {
    lines.push(`No errors were found on ${result.filename}.`);
  }
  if (report.leakedClusters > 0) {
    lines.push(
      `${report.leakedClusters} leaked clusters were found on the image.\n` +
        "This means waste of disk space, but no harm to data.",
    );
  }
  const stats = report.clusterStats;
  if (stats) {
    // As qemu-img: fragmented and compressed are shares of the allocated clusters.
    const pct = (n: number, of: number) => printfFixed2(of > 0 ? (100 * n) / of : 0);
    const allocated = stats.allocatedClusters;
    lines.push(
      `${allocated}/${stats.totalClusters} = ${pct(allocated, stats.totalClusters)}% allocated, ` +
        `${pct(stats.fragmentedClusters, allocated)}% fragmented, ` +
        `${pct(stats.compressedClusters, allocated)}% compressed clusters`,
      `Image end offset: ${stats.imageEndOffsetBytes}`,
    );
  }
  return lines.join("\n");
}

export const CHECK_COMMAND: Command = {
  name: "check",
  summary: "check an image's structure (qemu-img check)",
  usage: [
    "usage: blktap check IMAGE [--json] [--repair]",
    "",
    "Runs the structural check of IMAGE's format (`type:path` or a path).",
    "",
    "  --json     print the result as JSON",
    "  --repair   fix what can be fixed without risking data (leaks), then",
    "             check again",
    "",
    "Exit status: 0 clean (leaks allowed), 1 corrupt, 2 unusable or not",
    "checkable (formats without a check, such as raw, exit 2; qemu-img uses 63).",
  ].join("\n"),
  async run(argv) {
    const { values, positionals } = parseCommandArgs(argv, {
      json: { type: "boolean" },
      repair: { type: "boolean" },
    }, { min: 1, max: 1 });
    const result = await checkImage(positionals[0], values.repair ?? false);
    const text = values.json ? JSON.stringify(result, null, 2) : formatCheckHuman(result);
    console.log(text);
    const verdict = checkVerdict(result);
    if (verdict) console.error(`blktap check: ${verdict}`);
    return result.status;
  },
};
