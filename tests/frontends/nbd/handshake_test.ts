import assert from "node:assert/strict";
import * as P from "../../../src/frontends/nbd/protocol.ts";
import { MemoryDriver } from "../../_helpers/memory_driver.ts";
import { infoData, metaContextData, RawNbdClient } from "../../_helpers/nbd_client.ts";
import { withNbdServer } from "../../_helpers/nbd_harness.ts";

const MiB = 1 << 20;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function exports() {
  return [
    { name: "disk", driver: new MemoryDriver(8 * MiB), description: "a test disk" },
    { name: "ro", driver: new MemoryDriver(4 * MiB), readOnly: true },
    { name: "", driver: new MemoryDriver(2 * MiB) },
  ];
}

async function withClient(socket: string, body: (c: RawNbdClient) => Promise<void>) {
  const client = await RawNbdClient.connect(socket);
  try {
    await body(client);
  } finally {
    client.close();
  }
}

/** True when the server closed the connection (EOF or reset). */
async function closedByServer(client: RawNbdClient): Promise<boolean> {
  try {
    const got = await client.conn.read(new Uint8Array(64));
    return got === null;
  } catch {
    return true;
  }
}

Deno.test("nbd handshake: greeting, LIST with descriptions, INFO with every info type", async () => {
  await withNbdServer(exports(), async (h) => {
    await withClient(h.socket, async (c) => {
      const flags = await c.greet();
      assert.equal(flags, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
      const list = await c.optionReplies(P.NBD_OPT_LIST);
      assert.equal(list.at(-1)!.type, P.NBD_REP_ACK);
      const servers = list.filter((r) => r.type === P.NBD_REP_SERVER).map((r) => {
        const n = new DataView(r.data.buffer).getUint32(0);
        return [decoder.decode(r.data.subarray(4, 4 + n)), decoder.decode(r.data.subarray(4 + n))];
      });
      assert.deepEqual(servers, [["disk", "a test disk"], ["ro", ""], ["", ""]]);

      const wanted = [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE];
      const info = await c.optionReplies(P.NBD_OPT_INFO, infoData("disk", wanted));
      assert.equal(info.at(-1)!.type, P.NBD_REP_ACK);
      const byType = new Map(
        info.filter((r) => r.type === P.NBD_REP_INFO).map((r) => {
          return [new DataView(r.data.buffer).getUint16(0), r.data] as const;
        }),
      );
      const exp = new DataView(byType.get(P.NBD_INFO_EXPORT)!.buffer);
      assert.equal(Number(exp.getBigUint64(2)), 8 * MiB);
      const tflags = exp.getUint16(10);
      assert.ok(tflags & P.NBD_FLAG_HAS_FLAGS && tflags & P.NBD_FLAG_SEND_FLUSH);
      assert.ok(tflags & P.NBD_FLAG_CAN_MULTI_CONN && tflags & P.NBD_FLAG_SEND_WRITE_ZEROES);
      assert.equal(tflags & P.NBD_FLAG_SEND_DF, 0, "DF only after structured replies");
      assert.equal(decoder.decode(byType.get(P.NBD_INFO_NAME)!.subarray(2)), "disk");
      assert.equal(decoder.decode(byType.get(P.NBD_INFO_DESCRIPTION)!.subarray(2)), "a test disk");
      const bs = new DataView(byType.get(P.NBD_INFO_BLOCK_SIZE)!.buffer);
      assert.deepEqual([bs.getUint32(2), bs.getUint32(6), bs.getUint32(10)], [1, 4096, 32 * MiB]);

      // INFO leaves the client in option haggling: GO on the default export works.
      const go = await c.optionReplies(P.NBD_OPT_GO, infoData("", []));
      assert.equal(go.at(-1)!.type, P.NBD_REP_ACK);
      assert.equal(await c.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
    });
  });
});

Deno.test("nbd handshake: bad options get NBD_REP_ERR_* and haggling continues", async () => {
  await withNbdServer(exports(), async (h) => {
    await withClient(h.socket, async (c) => {
      await c.greet();
      const expectError = async (option: number, data: Uint8Array | undefined, type: number) => {
        const replies = await c.optionReplies(option, data);
        assert.equal(replies.length, 1);
        assert.equal(replies[0].option, option);
        assert.equal(replies[0].type, type, `option ${option}`);
      };
      await expectError(99, undefined, P.NBD_REP_ERR_UNSUP);
      await expectError(P.NBD_OPT_STARTTLS, undefined, P.NBD_REP_ERR_UNSUP);
      await expectError(P.NBD_OPT_LIST, new Uint8Array(3), P.NBD_REP_ERR_INVALID);
      await expectError(P.NBD_OPT_STRUCTURED_REPLY, new Uint8Array(1), P.NBD_REP_ERR_INVALID);
      await expectError(P.NBD_OPT_GO, infoData("nope", []), P.NBD_REP_ERR_UNKNOWN);
      await expectError(P.NBD_OPT_INFO, new Uint8Array([0, 0, 0, 9, 1]), P.NBD_REP_ERR_INVALID);
      await expectError(P.NBD_OPT_GO, infoData("disk", []).subarray(0, 9), P.NBD_REP_ERR_INVALID);
      await expectError(
        P.NBD_OPT_GO,
        new Uint8Array([0, 0, 0, 2, 0xff, 0xfe, 0, 0]),
        P.NBD_REP_ERR_INVALID,
      );
      const meta = metaContextData("disk", [P.BASE_ALLOCATION]);
      await expectError(P.NBD_OPT_SET_META_CONTEXT, meta, P.NBD_REP_ERR_INVALID); // before structured
      assert.equal((await c.optionReplies(P.NBD_OPT_STRUCTURED_REPLY))[0].type, P.NBD_REP_ACK);
      await expectError(
        P.NBD_OPT_SET_META_CONTEXT,
        metaContextData("nope", []),
        P.NBD_REP_ERR_UNKNOWN,
      );
      await expectError(
        P.NBD_OPT_LIST_META_CONTEXT,
        meta.subarray(0, meta.length - 1),
        P.NBD_REP_ERR_INVALID,
      );

      for (const queries of [[], ["base:"], [P.BASE_ALLOCATION]]) {
        const listed = await c.optionReplies(
          P.NBD_OPT_LIST_META_CONTEXT,
          metaContextData("disk", queries),
        );
        assert.deepEqual(listed.map((r) => r.type), [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]);
        assert.equal(decoder.decode(listed[0].data.subarray(4)), P.BASE_ALLOCATION);
      }
      const none = await c.optionReplies(
        P.NBD_OPT_SET_META_CONTEXT,
        metaContextData("disk", ["x-foo:bar"]),
      );
      assert.deepEqual(none.map((r) => r.type), [P.NBD_REP_ACK]);
      const set = await c.optionReplies(P.NBD_OPT_SET_META_CONTEXT, meta);
      assert.deepEqual(set.map((r) => r.type), [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]);
      assert.equal(new DataView(set[0].data.buffer).getUint32(0), P.BASE_ALLOCATION_ID);

      const go = await c.optionReplies(P.NBD_OPT_GO, infoData("disk", []));
      assert.equal(go.at(-1)!.type, P.NBD_REP_ACK);
      c.structured = true;
      await c.request(P.NBD_CMD_BLOCK_STATUS, 0, 5n, 0, 4096);
      const [chunk] = await c.readChunks();
      assert.equal(chunk.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
    });
  });
});

Deno.test("nbd handshake: NBD_OPT_EXPORT_NAME with and without zeroes; unknown name ends the session", async () => {
  await withNbdServer(exports(), async (h) => {
    for (const noZeroes of [true, false]) {
      await withClient(h.socket, async (c) => {
        await c.greet(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
        await c.sendOption(P.NBD_OPT_EXPORT_NAME, encoder.encode("ro"));
        const reply = await c.readExact(noZeroes ? 10 : 134);
        const view = new DataView(reply.buffer);
        assert.equal(Number(view.getBigUint64(0)), 4 * MiB);
        const flags = view.getUint16(8);
        assert.ok(flags & P.NBD_FLAG_READ_ONLY);
        assert.equal(
          flags & (P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FUA),
          0,
        );
        assert.equal(await c.command(P.NBD_CMD_WRITE, 0, 0, 4, new Uint8Array(4)), P.NBD_EPERM);
      });
    }
    await withClient(h.socket, async (c) => {
      await c.greet();
      await c.sendOption(P.NBD_OPT_EXPORT_NAME, encoder.encode("missing"));
      assert.ok(await closedByServer(c));
    });
  });
});

Deno.test("nbd handshake: ABORT, bad client flags, bad magic, oversized option end only that connection", async () => {
  await withNbdServer(exports(), async (h) => {
    const bystander = await RawNbdClient.connect(h.socket);
    try {
      await bystander.go("disk");
      await withClient(h.socket, async (c) => {
        await c.greet();
        const [ack] = await c.optionReplies(P.NBD_OPT_ABORT);
        assert.equal(ack.type, P.NBD_REP_ACK);
        assert.ok(await closedByServer(c));
      });
      await withClient(h.socket, async (c) => {
        await c.greet(0x80);
        assert.ok(await closedByServer(c));
      });
      await withClient(h.socket, async (c) => {
        await c.greet();
        await c.send(new Uint8Array(16).fill(0x41));
        assert.ok(await closedByServer(c));
      });
      await withClient(h.socket, async (c) => {
        await c.greet();
        const header = new Uint8Array(16);
        const view = new DataView(header.buffer);
        view.setBigUint64(0, P.IHAVEOPT);
        view.setUint32(8, P.NBD_OPT_GO);
        view.setUint32(12, 0xffffffff);
        await c.send(header);
        assert.ok(await closedByServer(c));
      });
      // The bystander never noticed.
      const data = encoder.encode("still here");
      assert.equal(await bystander.command(P.NBD_CMD_WRITE, 0, 0, data.length, data), 0);
      assert.deepEqual(await bystander.read(0, data.length), data);
    } finally {
      bystander.close();
    }
  });
});

Deno.test("nbd handshake: connections beyond connections_max are closed at accept", async () => {
  await withNbdServer(exports(), async (h) => {
    const first = await RawNbdClient.connect(h.socket);
    const second = await RawNbdClient.connect(h.socket);
    try {
      await first.go("disk");
      await second.go("disk");
      await withClient(h.socket, async (third) => {
        assert.ok(await closedByServer(third));
      });
      assert.equal(await first.command(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
    } finally {
      first.close();
      second.close();
    }
  }, { connections_max: 2 });
});

Deno.test("nbd handshake: a silent client is cut after handshake_timeout_ms", async () => {
  await withNbdServer(exports(), async (h) => {
    await withClient(h.socket, async (c) => {
      await c.readExact(18);
      assert.ok(await closedByServer(c));
    });
  }, { handshake_timeout_ms: 200 });
});
