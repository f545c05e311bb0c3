/**
 * `blktap check` for vmdk images: every sparse extent is checked by
 * sparse_check.ts; with `--repair` the image is opened read-write, which
 * already recovers an extent whose last writer died (vmdk.ts), and the
 * check repairs what is left.
 * @module
 */
import type { CheckOptions, CheckReport } from "../inspect.ts";
import { checkSparse, SparseFindings } from "./sparse_check.ts";
import { openVmdk, type OpenVmdkFile } from "./vmdk.ts";

/**
 * Runs the check on `path`; writes only with `repair`. `openFile` opens the
 * files (the crash simulator passes in-memory ones).
 */
export async function vmdkCheck(
  path: string,
  options: CheckOptions,
  openFile?: OpenVmdkFile,
): Promise<CheckReport> {
  let driver;
  try {
    driver = await openVmdk(path, { readOnly: !options.repair, cache: "writeback" }, openFile);
  } catch (error) {
    return { corruptions: [], leakedClusters: 0, unusable: (error as Error).message };
  }
  const findings = new SparseFindings();
  findings.repaired.push(...driver.recovered);
  try {
    for (const extent of driver.sparseExtents) {
      await checkSparse(extent, findings, options.repair);
    }
    if (options.repair) await driver.flush();
  } catch (error) {
    return { corruptions: findings.corruptions, leakedClusters: 0, unusable: String(error) };
  } finally {
    await driver.close();
  }
  if (findings.hidden > 0) findings.corruptions.push(`... and ${findings.hidden} more`);
  return {
    corruptions: findings.corruptions,
    leakedClusters: findings.leaked,
    repaired: options.repair ? findings.repaired : undefined,
  };
}
