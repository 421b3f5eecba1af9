// qlinear in the browser: runs a WGSL program exported by qlinear's wgpu backend
// (`qlinear.backends.wgpu.program`, format "qlinear.wgsl-program/1") on a WebGPU device.
//
// The program holds every shader module, pipeline, bind group layout and dispatch the
// wgpu backend itself runs for one plan; this module only replays it: no build step, no
// dependencies. Errors reject with the WebGPU implementation's own message: a WGSL
// compilation error (with line and column), a pipeline or validation error, an
// out-of-memory error, or a lost device.

export const FORMAT = "qlinear.wgsl-program/1";

const DEFAULT_POISON = 0xab;

/** navigator.gpu.requestAdapter(options), rejecting with the reason where there is none. */
export async function requestAdapter(options) {
  if (typeof navigator === "undefined" || !navigator.gpu) {
    throw new Error("WebGPU is unavailable: navigator.gpu is undefined (a browser with " +
                    "WebGPU is needed: Chrome or Edge 113+, served over http://localhost " +
                    "or https)");
  }
  const adapter = await navigator.gpu.requestAdapter(options);
  if (!adapter) {
    throw new Error("WebGPU: requestAdapter returned no adapter (the browser has WebGPU " +
                    "but no usable GPU; headless Chromium needs --enable-unsafe-webgpu " +
                    "--use-webgpu-adapter=swiftshader)");
  }
  return adapter;
}

function kebab(name) {
  return name.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());
}

function limitNames(limits) {
  // GPUSupportedLimits' attributes live on its prototype: for...in sees them.
  const names = [];
  for (const name in limits) {
    if (typeof limits[name] === "number") names.push(name);
  }
  return names.sort();
}

/** What qlinear's choosers need to know about `adapter`, with wgpu-py's limit names. */
export function adapterFacts(adapter) {
  const info = adapter.info || {};
  const limits = {};
  for (const name of limitNames(adapter.limits)) limits[kebab(name)] = adapter.limits[name];
  return {
    vendor: info.vendor || "",
    architecture: info.architecture || "",
    device: info.device || "",
    description: info.description || "",
    // GPUAdapterInfo.isFallbackAdapter replaced GPUAdapter.isFallbackAdapter.
    is_fallback: Boolean(info.isFallbackAdapter ?? adapter.isFallbackAdapter ?? false),
    features: [...adapter.features].sort(),
    limits,
    subgroup_min_size: info.subgroupMinSize ?? null,
    subgroup_max_size: info.subgroupMaxSize ?? null,
  };
}

function checkFormat(program) {
  if (!program || program.format !== FORMAT) {
    throw new Error(`program.format: expected "${FORMAT}", got ` +
                    JSON.stringify(program && program.format));
  }
}

/** A device with the features `program` needs and the adapter's maximum limits. */
export async function openDevice(adapter, program) {
  checkFormat(program);
  const needed = program.features || [];
  const missing = needed.filter((f) => !adapter.features.has(f));
  if (missing.length) {
    throw new Error(`features: the program needs ${JSON.stringify(needed)}, the adapter ` +
                    `lacks ${JSON.stringify(missing)} (export the program for this ` +
                    `adapter's facts)`);
  }
  const requiredLimits = {};
  for (const name of limitNames(adapter.limits)) requiredLimits[name] = adapter.limits[name];
  const device = await adapter.requestDevice({ requiredFeatures: needed, requiredLimits });
  device.lost.then((info) => {
    device.qlinearLost = `device lost (${info.reason}): ${info.message}`;
  });
  return device;
}

// -- bytes ------------------------------------------------------------------------------

/** Decode base64 text to bytes. */
export function base64ToBytes(text) {
  if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(text);
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Encode bytes as base64 text. */
export function bytesToBase64(bytes) {
  if (typeof bytes.toBase64 === "function") return bytes.toBase64();
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

function bufferSize(nbytes) {
  return Math.max(16, Math.ceil(nbytes / 4) * 4);
}

function padded(size, data) {
  // `data` followed by zero bytes up to `size`.
  const out = new Uint8Array(size);
  out.set(data.subarray(0, size));
  return out;
}

function filled(size, pattern) {
  // `pattern` repeated over `size` bytes (a poison pattern may be shorter than the buffer).
  const out = new Uint8Array(size);
  if (!pattern || pattern.length === 0) return out.fill(DEFAULT_POISON);
  for (let i = 0; i < size; i += pattern.length) {
    out.set(pattern.subarray(0, Math.min(pattern.length, size - i)), i);
  }
  return out;
}

// -- errors -------------------------------------------------------------------------------

const SCOPES = ["validation", "out-of-memory", "internal"];

async function scoped(device, what, body) {
  // Every error WebGPU reports while `body` runs rejects, named after `what`.
  for (const s of SCOPES) device.pushErrorScope(s);
  let result, thrown = null;
  try {
    result = await body();
  } catch (e) {
    thrown = e;
  }
  const errors = [];
  for (let i = SCOPES.length - 1; i >= 0; i--) {
    const err = await device.popErrorScope();
    if (err) errors.push(`${SCOPES[i]} error: ${err.message}`);
  }
  if (thrown) throw new Error(`${what}: ${thrown.message || thrown}`);
  if (errors.length) throw new Error(`${what}: ${errors.join("; ")}`);
  if (device.qlinearLost) throw new Error(`${what}: ${device.qlinearLost}`);
  return result;
}

async function compile(device, code, index) {
  const module = device.createShaderModule({ label: `qlinear module ${index}`, code });
  const info = await module.getCompilationInfo();
  const errors = info.messages.filter((m) => m.type === "error");
  if (errors.length) {
    const lines = errors.map((m) => `line ${m.lineNum}:${m.linePos}: ${m.message}`);
    throw new Error(`WGSL compilation of module ${index} failed:\n${lines.join("\n")}`);
  }
  return module;
}

function layoutEntries(layout) {
  const entries = Object.values(layout.storage).map((binding) => ({
    binding, visibility: GPUShaderStage.COMPUTE, buffer: { type: "storage" } }));
  if (layout.params !== null && layout.params !== undefined) {
    entries.push({ binding: layout.params, visibility: GPUShaderStage.COMPUTE,
                   buffer: { type: "uniform" } });
  }
  return entries.sort((a, b) => a.binding - b.binding);
}

// -- programs ------------------------------------------------------------------------------

/**
 * Compile `program`'s shader modules and create its bind group layouts and pipelines.
 * Resolves to {modules, layouts, pipelines}. WebGPU implementations keep a device's
 * pipelines by content while they are alive, so compiling ahead makes a later
 * prepareProgram of the same program on that device quick.
 */
export async function compileProgram(device, program) {
  checkFormat(program);
  const modules = [];
  for (let i = 0; i < program.modules.length; i++) {
    modules.push(await compile(device, program.modules[i], i));
  }
  const layouts = {};
  for (const [name, layout] of Object.entries(program.layouts)) {
    const bgl = device.createBindGroupLayout({ label: name, entries: layoutEntries(layout) });
    layouts[name] = { bgl, pl: device.createPipelineLayout({ bindGroupLayouts: [bgl] }),
                      spec: layout };
  }
  const pipelines = await Promise.all(program.pipelines.map(async (p, i) => {
    const label = p.label || p.entry;
    try {
      return await device.createComputePipelineAsync({
        label, layout: layouts[p.layout].pl,
        compute: { module: modules[p.module], entryPoint: p.entry,
                   constants: p.constants || {} } });
    } catch (e) {
      throw new Error(`pipeline ${i} (${label}, entry ${p.entry}): ${e.message || e}`);
    }
  }));
  return { modules, layouts, pipelines };
}

/**
 * Compile and build `program` on `device`: shader modules, layouts, pipelines, buffers and
 * bind groups. Returns {run(inputs, poison), destroy(), pipelines}; `run` may be called
 * many times; `destroy` frees the buffers.
 */
export async function prepareProgram(device, program) {
  checkFormat(program);
  const usage = GPUBufferUsage;
  const created = [];
  const buffer = (desc) => {
    const b = device.createBuffer(desc);
    created.push(b);
    return b;
  };
  const destroy = () => { for (const b of created) b.destroy(); created.length = 0; };

  const built = await scoped(device, "building the program", async () => {
    const { layouts, pipelines } = await compileProgram(device, program);
    const tensors = {};
    for (const [name, t] of Object.entries(program.tensors)) {
      const size = bufferSize(t.nbytes);
      tensors[name] = { spec: t, size, buffer: buffer({
        label: name, size, usage: usage.STORAGE | usage.COPY_SRC | usage.COPY_DST }) };
    }
    const paramBytes = program.params ? base64ToBytes(program.params) : new Uint8Array(0);
    let params = null;
    if (paramBytes.length) {
      params = buffer({ label: "params", size: bufferSize(paramBytes.length),
                        usage: usage.UNIFORM | usage.COPY_DST });
      device.queue.writeBuffer(params, 0, padded(bufferSize(paramBytes.length), paramBytes));
    }
    // One dummy per binding name: writable storage bindings of one dispatch must not alias.
    const dummies = {};
    const dummy = (name) => dummies[name] ||= buffer({ label: `dummy ${name}`, size: 16,
                                                       usage: usage.STORAGE });
    const steps = program.dispatches.map((d, i) => {
      const pipe = program.pipelines[d.pipeline];
      const layout = layouts[pipe.layout];
      const entries = Object.entries(d.bindings).map(([name, b]) => {
        const binding = layout.spec.storage[name];
        if (binding === undefined) {
          throw new Error(`dispatch ${i}: binding ${name} is not in layout ${pipe.layout}`);
        }
        const buf = b.tensor === null ? dummy(name) : tensors[b.tensor].buffer;
        return { binding, resource: { buffer: buf, offset: b.offset, size: b.size } };
      });
      if (layout.spec.params !== null && layout.spec.params !== undefined) {
        entries.push({ binding: layout.spec.params, resource: {
          buffer: params, offset: d.params * program.param_stride,
          size: layout.spec.params_size } });
      }
      return { pipeline: pipelines[d.pipeline], grid: d.grid,
               group: device.createBindGroup({ layout: layout.bgl, entries }) };
    });
    return { tensors, steps, pipelines };
  }).catch((e) => { destroy(); throw e; });

  const { tensors, steps, pipelines } = built;
  const outs = Object.entries(tensors).filter(([, t]) => t.spec.role !== "input");

  async function run(inputs = {}, poison = {}) {
    return await scoped(device, "running the program", async () => {
      for (const [name, t] of Object.entries(tensors)) {
        if (t.spec.role === "input") {
          const data = inputs[name];
          // The buffer layout's bytes, optionally padded to whole 4-byte words.
          if (!data || data.length < t.spec.nbytes || data.length > t.size) {
            throw new Error(`inputs.${name}: expected ${t.spec.nbytes} bytes, got ` +
                            (data ? data.length : "none"));
          }
          device.queue.writeBuffer(t.buffer, 0, padded(t.size, data));
        } else {
          device.queue.writeBuffer(t.buffer, 0, filled(t.size, poison[name]));
        }
      }
      const enc = device.createCommandEncoder({ label: "qlinear program" });
      const pass = enc.beginComputePass();
      for (const s of steps) {
        pass.setPipeline(s.pipeline);
        pass.setBindGroup(0, s.group);
        pass.dispatchWorkgroups(s.grid[0], s.grid[1], s.grid[2]);
      }
      pass.end();
      const reads = outs.map(([name, t]) => {
        const staging = device.createBuffer({ label: `read ${name}`, size: t.size,
                                              usage: usage.MAP_READ | usage.COPY_DST });
        enc.copyBufferToBuffer(t.buffer, 0, staging, 0, t.size);
        return [name, t, staging];
      });
      device.queue.submit([enc.finish()]);
      const result = {};
      try {
        await Promise.all(reads.map(([, , s]) => s.mapAsync(GPUMapMode.READ)));
        for (const [name, t, s] of reads) {
          result[name] = new Uint8Array(s.getMappedRange(0, t.size)).slice(0, t.spec.nbytes);
          s.unmap();
        }
      } finally {
        for (const [, , s] of reads) s.destroy();
      }
      return result;
    });
  }
  return { run, destroy, pipelines };
}

/**
 * Run `program` once on `device`: `inputs` {name: Uint8Array} for every "input" tensor,
 * `poison` {name: Uint8Array} (optional) fills the output and scratch buffers first.
 * Resolves to {name: Uint8Array} of every output and scratch tensor (nbytes bytes each).
 */
export async function runProgram(device, program, inputs, poison = {}) {
  const prepared = await prepareProgram(device, program);
  try {
    return await prepared.run(inputs, poison);
  } finally {
    prepared.destroy();
  }
}
