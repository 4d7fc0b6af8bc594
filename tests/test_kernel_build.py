"""Every Triton kernel compiles to real sm_80 and sm_90 code, in fp32 and bf16, on this
CPU-only machine, without spilling, and kernels that stream hidden states load 128 bits
per thread.

bench/build_report.py does the work in a subprocess without TRITON_INTERPRET (under the
interpreter @triton.jit returns an interpreted function that cannot be compiled).
"""
import pytest

from bench import build_report

EXPECTED_PAIRWISE = {"pairwise_rewards_fwd", "pairwise_pair_loss", "pairwise_reward_grad",
                     "pairwise_hidden_grad", "pairwise_rewards_fwd_nonorm", "pairwise_hidden_grad_nonorm"}


@pytest.fixture(scope="module")
def report():
    return build_report.run_subprocess()


def rows_of(report, module):
    return [r for r in report if r["module"] == module]


def test_manifest_lists_both_kernel_files():
    assert list(build_report.SPECS) == ["kernels.pairwise_loss", "kernels.logprobs"]


@pytest.mark.parametrize("module", list(build_report.SPECS))
def test_every_kernel_builds_for_every_arch_and_dtype(report, module):
    rows = rows_of(report, module)
    kernels = {r["kernel"] for r in rows}
    assert kernels, f"the manifest of {module} lists no kernels"
    if module == "kernels.pairwise_loss":
        assert kernels == EXPECTED_PAIRWISE
    built = {(r["kernel"], r["arch"], r["dtype"]) for r in rows if r["cubin_bytes"] > 0}
    wanted = {(k, f"sm_{cap}", dtype) for k in kernels for cap in build_report.ARCHS
              for dtype in build_report.DTYPES}
    assert built == wanted


@pytest.mark.parametrize("module", list(build_report.SPECS))
def test_no_spills(report, module):
    spilling = [f"{r['kernel']} {r['arch']} {r['dtype']}: stack {r['stack']} B, local {r['local']} B, "
                f"{r['regs']} regs" for r in rows_of(report, module) if r["stack"] or r["local"]]
    assert not spilling, "kernels with local memory (register spills):\n" + "\n".join(spilling)


@pytest.mark.parametrize("module", list(build_report.SPECS))
def test_hidden_state_loads_are_128_bit(report, module):
    narrow = [f"{r['kernel']} {r['arch']} {r['dtype']}" for r in rows_of(report, module)
              if r["hidden_loads"] and r["ld128"] == 0]
    assert not narrow, "hidden-state loads not vectorized to 128 bits:\n" + "\n".join(narrow)


def test_load_width_parser():
    """The PTX parser counts bits per thread: v4 x 32 = 128, v2 x 64 = 128, v4 x 16 = 64,
    and a 16-byte cp.async into shared memory is 128 (an 8-byte one is not)."""
    ptx = """
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        ld.global.v2.b64 { %rd5, %rd6 }, [ %rd2 + 0 ];
        @%p2 ld.global.v4.b16 { %rs1, %rs2, %rs3, %rs4 }, [ %rd3 + 0 ];
        ld.global.b64 %rd7, [ %rd4 + 0 ];
        cp.async.cg.shared.global [ %r71 + 0 ], [ %rd33 + 0 ], 0x10, %r72;
        cp.async.ca.shared.global [ %r73 + 0 ], [ %rd34 + 0 ], 8;
    """
    assert build_report.global_loads(ptx) == dict(ld128=3, ld_total=6)
