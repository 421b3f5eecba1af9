// The conformance harness: runs the cases tests/test_dawn.py wrote under /data/ through
// the browser example's own module (examples/web/qlinear.js, served under /web/).

import * as ql from "/web/qlinear.js";

// The optional features cases may need. One device holds all of them that the adapter
// has, so that every case shares its pipeline cache: compiling pipelines dominates the
// time on SwiftShader, and a pipeline used by several cases is compiled once.
const FEATURES = ["shader-f16", "subgroups"];
let devicePromise = null;
// Every pipeline made so far: the implementation keeps a pipeline for reuse only while it
// is alive.
const keep = [];

function sharedDevice() {
  devicePromise ||= (async () => {
    const adapter = await ql.requestAdapter();
    const features = FEATURES.filter((f) => adapter.features.has(f));
    return ql.openDevice(adapter, { format: ql.FORMAT, features });
  })();
  return devicePromise;
}

async function deviceFor(program) {
  const device = await sharedDevice();
  if (device.qlinearLost) throw new Error(device.qlinearLost);
  if ((program.features || []).every((f) => device.features.has(f))) return device;
  // Refused with openDevice's message (each adapter gives one device: a fresh one).
  return ql.openDevice(await ql.requestAdapter(), program);
}

function decodeAll(obj) {
  const out = {};
  for (const [name, text] of Object.entries(obj || {})) out[name] = ql.base64ToBytes(text);
  return out;
}

function encodeAll(obj) {
  const out = {};
  for (const [name, bytes] of Object.entries(obj)) out[name] = ql.bytesToBase64(bytes);
  return out;
}

// One case: {program, inputs: {name: base64}, poison: {name: base64}}. Resolves to
// {outputs: {name: base64}, build_ms, run_ms} or {error}.
async function runCase(c) {
  const t0 = performance.now();
  try {
    const device = await deviceFor(c.program);
    const prepared = await ql.prepareProgram(device, c.program);
    keep.push(prepared.pipelines);
    const t1 = performance.now();
    try {
      const outputs = await prepared.run(decodeAll(c.inputs), decodeAll(c.poison));
      return { outputs: encodeAll(outputs), build_ms: t1 - t0, run_ms: performance.now() - t1 };
    } finally {
      prepared.destroy();
    }
  } catch (e) {
    return { error: String((e && e.message) || e), ms: performance.now() - t0 };
  }
}

window.qlHarness = {
  async facts() {
    return { facts: ql.adapterFacts(await ql.requestAdapter()),
             userAgent: navigator.userAgent };
  },
  // Cases by name, fetched from /data/<name>.json, run one after another (each with its
  // own error scopes, which cases run concurrently would mix up).
  async runCases(names) {
    const results = {};
    for (const name of names) {
      const r = await fetch(`/data/${name}.json`);
      if (!r.ok) {
        results[name] = { error: `fetching /data/${name}.json: HTTP ${r.status}` };
        continue;
      }
      results[name] = await runCase(await r.json());
    }
    return results;
  },
  runCase,
};
window.qlinearReady = Promise.resolve(true);
