/**
 * `blktap create` has two forms, as the issues ask: making an image
 * (`qemu-img create`'s form: `-f FMT ... FILE SIZE`) and attaching one as a
 * minor (`TYPE:PATH`, the ctrl verb). The form is told by the arguments:
 * any of `-f -o -b -F -q`, or two positionals the second of which is a
 * SIZE, make an image; otherwise it attaches.
 * @module
 */
import { type Command, parseCommandArgs } from "./command.ts";
import { ATTACH_VERB } from "../ctl/verbs.ts";
import { createImage } from "../tools/create_image.ts";
import { formatNames } from "../formats/open_image.ts";

const IMAGE_USAGE =
  `usage: blktap create [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] [-q] FILE [SIZE]

Makes a new image FILE, as qemu-img create does (FILE is never overwritten).

  -f FMT          raw (default), qcow, qcow2, vmdk, vhd (alias vpc)
  -o OPTIONS      KEY=VALUE[,KEY=VALUE...], per format (may repeat):
                    raw:  preallocation=off|falloc
                    qcow: preallocation=off|full
                    qcow2: compat=0.10|1.1, cluster_size=SIZE (512 to 2M,
                          default 64K), refcount_bits=1..64 (default 16),
                          lazy_refcounts=on|off, preallocation=off|metadata|
                          falloc|full
                    vmdk: subformat=monolithicSparse
                    vhd:  subformat=dynamic|fixed, block_size=SIZE (default 2M),
                          force_size=on|off (keep SIZE exactly instead of
                          rounding it up to a CHS geometry, as qemu-img)
  -b BACKING      backing file (qcow, qcow2, vhd); a relative name is stored
                  as given when it resolves from FILE's folder, else as an
                  absolute path
  -F BACKING_FMT  the backing file's format (default: read from its header);
                  vhd records only vhd or raw parents
  -q              do not print the 'Formatting ...' line
  SIZE            bytes, or with a suffix K, M, G, T, P (powers of 1024);
                  may be omitted with -b: the backing file's size`;

/** Options of the image form; their presence selects it. */
const image_options = {
  format: { type: "string", short: "f" },
  options: { type: "string", short: "o", multiple: true },
  backing: { type: "string", short: "b" },
  "backing-format": { type: "string", short: "F" },
  quiet: { type: "boolean", short: "q" },
} as const;

/** Long options of either form that take no value (any other takes the next argument). */
const flag_options = new Set(["--readonly", "--json", "--help", "--quiet"]);
const image_long = new Set(["--format", "--options", "--backing", "--backing-format", "--quiet"]);

/**
 * True when `argv` asks for a new image rather than an attachment: an
 * image option (`-f -o -b -F -q`), or a second positional that is a SIZE.
 */
export function isImageCreation(argv: string[]): boolean {
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i += 1) {
    const token = argv[i];
    if (token === "--") {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (/^-[fobFq]/.test(token) || image_long.has(token.split("=")[0])) return true;
    if (token.startsWith("--")) {
      if (!token.includes("=") && !flag_options.has(token)) i += 1;
      continue;
    }
    if (token.startsWith("-") && token !== "-") continue;
    positionals.push(token);
  }
  return positionals.length >= 2 && /^\d+(\.\d+)?\s*[a-zA-Z]*$/.test(positionals[1]);
}

async function runImageForm(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs(argv, image_options, { min: 1, max: 2 });
  await createImage({
    format: values.format ?? "raw",
    file: positionals[0],
    sizeText: positionals[1],
    options: (values.options as unknown as string[] | undefined) ?? [],
    backing: values.backing,
    backingFormat: values["backing-format"],
    quiet: values.quiet ?? false,
  });
  return 0;
}

/** `blktap create`, both forms. */
export const CREATE_COMMAND: Command = {
  name: "create",
  summary: "make a new image (-f FMT FILE SIZE), or attach one as a minor (TYPE:PATH)",
  usage: [
    "blktap create has two forms:",
    "",
    "1. Make an image (FILE SIZE, or any of -f -o -b -F -q):",
    "",
    IMAGE_USAGE,
    "",
    "2. Attach an image to the ctrl daemon as a new minor (otherwise):",
    "",
    ATTACH_VERB.usage,
    "",
    `Formats blktap reads: ${formatNames().join(", ")}.`,
  ].join("\n"),
  run(argv) {
    return isImageCreation(argv) ? runImageForm(argv) : ATTACH_VERB.run(argv);
  },
};
