// Decodes orderbook.Summary (proto/orderbook.proto) from the bytes the daemon
// serialized once for every client: the server never re-encodes for the page.
"use strict";

const SummaryDecoder = (() => {
  const STATES = ["UNSPECIFIED", "SYNCING", "LIVE", "STALE"];
  const utf8 = new TextDecoder();

  class Reader {
    constructor(bytes, start = 0, end = bytes.length) {
      this.bytes = bytes;
      this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      this.pos = start;
      this.end = end;
    }
    more() { return this.pos < this.end; }
    varint() {
      // Multiplication, not shifts: timestamp_us needs more than 32 bits
      // (exact up to 2**53, some 285 years of microseconds).
      let value = 0, scale = 1, byte;
      do {
        if (this.pos >= this.end) throw new Error("truncated varint");
        byte = this.bytes[this.pos++];
        value += (byte & 0x7f) * scale;
        scale *= 128;
      } while (byte & 0x80);
      return value;
    }
    double() {
      if (this.pos + 8 > this.end) throw new Error("truncated double");
      const value = this.view.getFloat64(this.pos, true);
      this.pos += 8;
      return value;
    }
    sub() {
      const length = this.varint();
      if (this.pos + length > this.end) throw new Error("truncated field");
      const reader = new Reader(this.bytes, this.pos, this.pos + length);
      this.pos += length;
      return reader;
    }
    string() { const r = this.sub(); return utf8.decode(this.bytes.subarray(r.pos, r.end)); }
    skip(wireType) {
      if (wireType === 0) this.varint();
      else if (wireType === 1) this.pos += 8;
      else if (wireType === 2) this.sub();
      else if (wireType === 5) this.pos += 4;
      else throw new Error("unsupported wire type " + wireType);
    }
  }

  function fields(reader, onField) {
    while (reader.more()) {
      const key = reader.varint();
      onField(Math.floor(key / 8), key & 7);
    }
  }

  function level(reader) {
    const out = { exchange: "", price: 0, amount: 0 };
    fields(reader, (field, wire) => {
      if (field === 1 && wire === 2) out.exchange = reader.string();
      else if (field === 2 && wire === 1) out.price = reader.double();
      else if (field === 3 && wire === 1) out.amount = reader.double();
      else reader.skip(wire);
    });
    return out;
  }

  function exchangeState(reader) {
    const out = { exchange: "", state: "UNSPECIFIED", reason: "" };
    fields(reader, (field, wire) => {
      if (field === 1 && wire === 2) out.exchange = reader.string();
      else if (field === 2 && wire === 0) out.state = STATES[reader.varint()] || "UNSPECIFIED";
      else if (field === 3 && wire === 2) out.reason = reader.string();
      else reader.skip(wire);
    });
    return out;
  }

  function decode(buffer) {
    const reader = new Reader(new Uint8Array(buffer));
    // proto3: an absent double is 0, but the daemon always writes the spread
    // (NaN when a side is empty).
    const summary = { spread: 0, bids: [], asks: [], exchanges: [], timestampUs: 0 };
    fields(reader, (field, wire) => {
      if (field === 1 && wire === 1) summary.spread = reader.double();
      else if (field === 2 && wire === 2) summary.bids.push(level(reader.sub()));
      else if (field === 3 && wire === 2) summary.asks.push(level(reader.sub()));
      else if (field === 4 && wire === 2) summary.exchanges.push(exchangeState(reader.sub()));
      else if (field === 5 && wire === 0) summary.timestampUs = reader.varint();
      else reader.skip(wire);
    });
    return summary;
  }

  return { decode };
})();
