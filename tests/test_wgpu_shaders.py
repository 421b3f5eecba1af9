"""WGSL composition, and the Python side of the kernels' interfaces checked against the
WGSL text: each uniform struct against its numpy dtype, each binding against its
layout table (these need no adapter)."""

import re

import numpy as np
import pytest

import qlinear as ql
from qlinear.backends.wgpu import layouts
from qlinear.backends.wgpu.dispatch import PARAM_STRIDE, pack_params
from qlinear.backends.wgpu.layouts import LAYOUTS
from qlinear.backends.wgpu.shaders import FAMILY_LAYOUT, shader_source
from qlinear.resources import read_source


def test_shader_composition(wgpu_be):
    """The one templating step: a prelude per TIn storage, composed with common code."""
    for family in ("rowquant", "gemm_dot4", "gemm_f32", "gemv"):
        words = wgpu_be.shader_source(family, "words")
        native = wgpu_be.shader_source(family, "f16")
        assert "enable f16;" not in words
        assert native.startswith("enable f16;")
        assert ("fn store_pair" in words) == (family != "rowquant")
        wgpu_be.compile_wgsl(words, family)
        if "shader-f16" in wgpu_be.features:
            wgpu_be.compile_wgsl(native, family)
    with pytest.raises(ql.InvalidProblem):
        wgpu_be.shader_source("rowquant", "f64")


_SUBGROUP_BUILTINS = re.compile(r"\bsubgroup\w*\s*\(")


@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUT))
@pytest.mark.parametrize("elem", ["words", "f16"])
def test_sources_without_subgroups_use_none(family, elem):
    """What adapters without the feature compile: no subgroup builtin, no directive, and
    the same text for naga and Tint."""
    naga = shader_source(family, elem)
    assert not _SUBGROUP_BUILTINS.search(_COMMENT.sub("", naga))
    assert "enable subgroups" not in naga
    assert shader_source(family, elem, target="tint") == naga


@pytest.mark.parametrize("family,uses", [("gemv", {"subgroupAdd", "subgroupMin", "subgroupMax"}),
                                         ("rowquant", {"subgroupMin", "subgroupMax"})])
@pytest.mark.parametrize("elem", ["words", "f16"])
def test_subgroup_sources_swap_only_the_reduction(family, uses, elem):
    """The subgroup variant is the same kernel with the other reduction file: Tint gets
    the ``enable subgroups;`` directive first (before ``enable f16;``), naga never."""
    plain = shader_source(family, elem)
    naga = shader_source(family, elem, subgroups=True)
    tint = shader_source(family, elem, subgroups=True, target="tint")
    assert tint == "enable subgroups;\n" + naga
    assert "enable subgroups" not in naga
    assert naga.startswith("enable f16;") == (elem == "f16")
    found = {m.rstrip(" (") for m in _SUBGROUP_BUILTINS.findall(_COMMENT.sub("", naga))}
    assert found == uses
    own = read_source("shaders", f"{family}.wgsl")
    wg, sg = (read_source("shaders", f"{family}_reduce{s}.wgsl") for s in ("", "_sg"))
    assert plain.endswith(own + "\n" + wg) and naga.endswith(own + "\n" + sg)
    assert plain[:-len(wg)] == naga[:-len(sg)]
    # Both reduction files define the functions the kernel calls, and nothing else.
    names = {f: set(re.findall(r"\bfn\s+(\w+)", f)) for f in (wg, sg)}
    assert names[wg] == names[sg] and names[wg] <= set(re.findall(r"\b(\w+)\(", own))


def test_subgroups_only_where_a_family_reduces(wgpu_be):
    for family in ("gemm_dot4", "gemm_f32", "matmul_f32", "micro"):
        with pytest.raises(ql.InvalidProblem, match=f"subgroups: expected False for family "
                                                    f"'{family}'"):
            shader_source(family, subgroups=True)
    with pytest.raises(ql.InvalidProblem, match="target: expected one of"):
        shader_source("gemv", target="dawn")
    if not wgpu_be.facts.subgroups:
        pytest.skip(f"adapter {wgpu_be.device_name} has no subgroup feature")
    for family in ("rowquant", "gemv"):
        wgpu_be.compile_wgsl(shader_source(family, subgroups=True), family)


# -- the Python side of the WGSL interfaces (no adapter) ---------------------------------

_COMMENT = re.compile(r"//[^\n]*")
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{([^}]*)\}")
_FIELD = re.compile(r"(\w+)\s*:\s*(\w+)\s*(?:,|$)")
_BINDING = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var(?:<[^>]*>)?\s+(\w+)\s*:")
_WGSL_SCALARS = {"u32": np.dtype("<u4"), "i32": np.dtype("<i4"), "f32": np.dtype("<f4")}


def _wgsl_struct(text, name):
    """[(field, type)] of ``struct name`` in WGSL ``text``, in order."""
    structs = {n: body for n, body in _STRUCT.findall(_COMMENT.sub("", text))}
    assert name in structs, f"no struct {name}"
    return _FIELD.findall(structs[name].strip())


@pytest.mark.parametrize("file,struct", [("linear_io.wgsl", "LinearParams"),
                                         ("rowquant.wgsl", "QuantParams"),
                                         ("matmul_f32.wgsl", "MatmulParams")])
def test_uniform_structs_match_their_dtypes(file, struct):
    """Each parameter block's numpy dtype is named after its WGSL struct and has the
    struct's fields, in order, with the same scalar types, packed as WGSL packs scalars."""
    dtype = getattr(layouts, struct)
    fields = _wgsl_struct(read_source("shaders", file), struct)
    assert len(fields) >= 4
    assert list(dtype.names) == [n for n, _ in fields]
    for name, wgsl_type in fields:
        assert dtype.fields[name][0] == _WGSL_SCALARS[wgsl_type], (struct, name)
    assert [dtype.fields[n][1] for n in dtype.names] == [4 * i for i in range(len(fields))]
    assert dtype.itemsize == 4 * len(fields) and dtype.itemsize % 16 == 0


@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUT))
def test_bindings_match_the_layout_tables(family):
    """Every ``@binding`` the composed kernel declares is its layout's, by name and number,
    and the layout declares no binding the kernel lacks; the uniform block's struct is the
    one whose dtype the layout holds."""
    layout = LAYOUTS[FAMILY_LAYOUT[family]]
    text = _COMMENT.sub("", shader_source(family))
    declared = {name: int(b) for b, name in _BINDING.findall(text)}
    assert declared == layout.bindings()
    if layout.params is not None:
        uniform = re.search(r"var<uniform>\s+p\s*:\s*(\w+)\s*;", text).group(1)
        assert getattr(layouts, uniform) is layout.params


def test_parameter_blocks_are_built_by_field_name():
    common = dict(zp_base=0, in_scale=0x3f800000)
    data = pack_params(layouts.QuantParams,
                       [dict(k=5, kw=2, x_base=1, q_base=2, s_base=3, in_zp=0, **common),
                        dict(k=9, kw=3, x_base=0, q_base=0, s_base=7, in_zp=-128, **common)])
    assert data.shape == (2, PARAM_STRIDE)
    rec = data[1, :layouts.QuantParams.itemsize].view(layouts.QuantParams)[0]
    assert (rec["k"], rec["kw"], rec["s_base"], rec["in_zp"]) == (9, 3, 7, -128)
    assert not data[:, layouts.QuantParams.itemsize:].any()
    with pytest.raises(ValueError, match="s_base"):
        pack_params(layouts.QuantParams, [dict(k=5, kw=2, x_base=1, q_base=2, in_zp=0, **common)])
    with pytest.raises(ValueError, match="bogus"):
        pack_params(layouts.MatmulParams, [dict(m=1, n=1, k=1, bogus=0)])


def test_the_tiled_gemms_share_their_tile_loads():
    for family in ("gemm_dot4", "gemm_f32"):
        own = read_source("shaders", f"{family}.wgsl")
        assert "fn load_tiles" not in own and "override BM" not in own
        assert "load_tiles(tid, row0, col0, k0);" in own
        composed = shader_source(family)
        assert composed.count("fn load_tiles") == 1 and composed.count("override BM") == 1
    with pytest.raises(ql.InvalidProblem, match="elem"):
        shader_source("gemm_f32", "f64")
