import assert from "node:assert/strict";
import { SysError } from "../../../ffi/errno.ts";
import { BlockError } from "../../../src/formats/driver.ts";
import * as P from "../../../src/frontends/nbd/protocol.ts";

Deno.test("nbd protocol: driver and system errors map to the error values proto.md allows", () => {
  const cases: [unknown, number][] = [
    [new BlockError("EPERM", "x"), P.NBD_EPERM],
    [new BlockError("EIO", "x"), P.NBD_EIO],
    [new BlockError("EINVAL", "x"), P.NBD_EINVAL],
    [new BlockError("ENOSPC", "x"), P.NBD_ENOSPC],
    [new BlockError("EOVERFLOW", "x"), P.NBD_EOVERFLOW],
    [new BlockError("EOPNOTSUPP", "x"), P.NBD_ENOTSUP],
    [new SysError("pwrite", 28, "/f"), P.NBD_ENOSPC],
    [new SysError("pwrite", 122, "/f"), P.NBD_ENOSPC], // EDQUOT
    [new SysError("pwrite", 27, "/f"), P.NBD_ENOSPC], // EFBIG
    [new SysError("open", 30, "/f"), P.NBD_EPERM], // EROFS
    [new SysError("mmap", 12), P.NBD_ENOMEM],
    [new SysError("io_submit", 11), P.NBD_EIO], // EAGAIN has no wire value
    [new Error("boom"), P.NBD_EIO],
    ["not an error", P.NBD_EIO],
  ];
  for (const [error, expected] of cases) assert.equal(P.nbdErrorOf(error), expected, String(error));
});

Deno.test("nbd protocol: option numbers and flags match the current proto.md", () => {
  // LIST/SET_META_CONTEXT are 9 and 10 (an early draft had BLOCK_SIZE at 9).
  assert.deepEqual([P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT], [9, 10]);
  assert.deepEqual([P.NBD_OPT_INFO, P.NBD_OPT_GO, P.NBD_OPT_STRUCTURED_REPLY], [6, 7, 8]);
  assert.equal(P.NBD_FLAG_SEND_CACHE, 1 << 10);
  assert.equal(P.NBD_FLAG_SEND_FAST_ZERO, 1 << 11);
  assert.equal(P.NBD_REP_ERR_UNKNOWN, 2 ** 31 + 6);
  assert.equal(P.NBD_REPLY_TYPE_ERROR, 2 ** 15 + 1);
});
