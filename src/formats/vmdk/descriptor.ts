/**
 * The VMDK text descriptor (VMware "Virtual Disk Format 1.1" §3): `key=value`
 * lines (`createType`, `CID`, `parentCID`, ...), extent lines
 * (`RW 4194304 FLAT "disk-f001.vmdk" 0`) and the disk database (`ddb.*`).
 * It lives in its own small file (monolithicFlat, twoGbMaxExtent*) or inside
 * the sparse extent (monolithicSparse, streamOptimized).
 * @module
 */

/** How an extent may be accessed. */
export type ExtentAccess = "RW" | "RDONLY" | "NOACCESS";

/** One extent line. */
export interface DescriptorExtent {
  access: ExtentAccess;
  sizeSectors: number;
  /** FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, ... as written. */
  type: string;
  /** File name as written (relative to the descriptor's folder), absent for ZERO. */
  fileName?: string;
  /** Start of the extent inside a FLAT file. */
  offsetSectors: number;
}

/** A parsed descriptor. */
export interface Descriptor {
  version: number;
  createType: string;
  cid: string;
  /** `ffffffff` when the disk has no parent. */
  parentCid: string;
  parentFileNameHint?: string;
  extents: DescriptorExtent[];
  /** Every `key=value` line, including `ddb.*`, unquoted. */
  values: Map<string, string>;
}

/** The `parentCID` of a disk without parent. */
export const NO_PARENT_CID = "ffffffff";
/** Extent lines accepted in one descriptor (a 2 TiB twoGbMaxExtentFlat has 1024). */
export const descriptor_extents_max = 16384;

/** A descriptor that cannot be used. */
export class DescriptorError extends Error {
  readonly kind = "vmdk-descriptor";
}

const EXTENT_LINE = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/;
const VALUE_LINE = /^([A-Za-z][\w.]*)\s*=\s*(?:"([^"]*)"|(\S*))\s*$/;

/** True when `head` looks like a text descriptor (for format probing). */
export function looksLikeDescriptor(head: Uint8Array): boolean {
  const text = new TextDecoder("latin1").decode(head.subarray(0, 64));
  return text.startsWith("# Disk DescriptorFile");
}

function parseExtent(match: RegExpExecArray, lineNumber: number): DescriptorExtent {
  const [, access, sizeText, type, fileName, offsetText] = match;
  const sizeSectors = Number(sizeText);
  const offsetSectors = offsetText === undefined ? 0 : Number(offsetText);
  if (!Number.isSafeInteger(sizeSectors * 512) || sizeSectors <= 0) {
    throw new DescriptorError(`line ${lineNumber}: invalid extent size '${sizeText}'`);
  }
  if (!Number.isSafeInteger(offsetSectors * 512)) {
    throw new DescriptorError(`line ${lineNumber}: invalid extent offset '${offsetText}'`);
  }
  const upperType = type.toUpperCase();
  if (upperType !== "ZERO" && (fileName === undefined || fileName === "")) {
    throw new DescriptorError(`line ${lineNumber}: ${upperType} extent without a file name`);
  }
  if (upperType === "FLAT" && offsetText === undefined) {
    throw new DescriptorError(`line ${lineNumber}: FLAT extent without an offset`);
  }
  return {
    access: access as ExtentAccess,
    sizeSectors,
    type: upperType,
    fileName,
    offsetSectors,
  };
}

/**
 * Parses descriptor text (NUL-terminated padding is ignored). Throws
 * {@linkcode DescriptorError} naming the line at fault.
 */
export function parseDescriptor(text: string): Descriptor {
  const nul = text.indexOf("\0");
  const body = nul >= 0 ? text.slice(0, nul) : text;
  const values = new Map<string, string>();
  const extents: DescriptorExtent[] = [];
  const lines = body.split(/\r?\n/);
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i].trim();
    if (line === "" || line.startsWith("#")) continue;
    const extent = EXTENT_LINE.exec(line);
    if (extent) {
      if (extents.length >= descriptor_extents_max) {
        throw new DescriptorError(`more than ${descriptor_extents_max} extents`);
      }
      extents.push(parseExtent(extent, i + 1));
      continue;
    }
    const value = VALUE_LINE.exec(line);
    if (!value) throw new DescriptorError(`line ${i + 1}: cannot parse '${line.slice(0, 80)}'`);
    values.set(value[1], value[2] ?? value[3]);
  }
  const versionText = values.get("version");
  const version = Number(versionText);
  if (versionText === undefined) throw new DescriptorError("no 'version' line");
  if (![1, 2, 3].includes(version)) {
    throw new DescriptorError(`unsupported descriptor version '${versionText}'`);
  }
  const createType = values.get("createType");
  if (!createType) throw new DescriptorError("no 'createType' line");
  return {
    version,
    createType,
    cid: (values.get("CID") ?? "").toLowerCase(),
    parentCid: (values.get("parentCID") ?? NO_PARENT_CID).toLowerCase(),
    parentFileNameHint: values.get("parentFileNameHint"),
    extents,
    values,
  };
}

/** Throws a clear error for delta links (snapshots): blktap does not open them. */
export function refuseDeltaLink(descriptor: Descriptor, path: string): void {
  if (descriptor.parentCid === NO_PARENT_CID && descriptor.parentFileNameHint === undefined) {
    return;
  }
  const hint = descriptor.parentFileNameHint ? ` (parent '${descriptor.parentFileNameHint}')` : "";
  throw new DescriptorError(
    `${path}: unsupported: vmdk delta link with parentCID=${descriptor.parentCid}${hint}; ` +
      "convert the chain to a single image first (qemu-img convert)",
  );
}

/** Options of {@linkcode formatDescriptor}. */
export interface DescriptorText {
  cid: string;
  createType: string;
  extents: DescriptorExtent[];
  capacitySectors: number;
}

/** The descriptor text QEMU and VMware write, with an IDE geometry. */
export function formatDescriptor(d: DescriptorText): string {
  const extentLines = d.extents.map((e) => {
    const name = e.fileName === undefined ? "" : ` "${e.fileName}"`;
    const offset = e.type === "FLAT" ? ` ${e.offsetSectors}` : "";
    return `${e.access} ${e.sizeSectors} ${e.type}${name}${offset}`;
  });
  const cylinders = Math.min(Math.max(1, Math.floor(d.capacitySectors / (16 * 63))), 16383);
  return [
    "# Disk DescriptorFile",
    "version=1",
    `CID=${d.cid}`,
    `parentCID=${NO_PARENT_CID}`,
    `createType="${d.createType}"`,
    "",
    "# Extent description",
    ...extentLines,
    "",
    "# The Disk Data Base",
    "#DDB",
    "",
    'ddb.virtualHWVersion = "4"',
    `ddb.geometry.cylinders = "${cylinders}"`,
    'ddb.geometry.heads = "16"',
    'ddb.geometry.sectors = "63"',
    'ddb.adapterType = "ide"',
    "",
  ].join("\n");
}
