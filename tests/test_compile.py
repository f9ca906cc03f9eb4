"""CPU test: every TileLang kernel builds for sm_80 and sm_90a with its default schedule, without spills and within
the shared-memory limit (this is `kla-tl compile`; no GPU is needed)."""

import io
import shutil

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit) to build cubins")]


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_every_kernel_builds_without_spills(arch):
    from kla_tl.cli.compile import compile_all, failures
    from kla_tl.kernels.registry import all_specs

    out = io.StringIO()
    rows = compile_all(archs=(arch,), out=out)
    print(out.getvalue())
    assert {r["kernel"] for r in rows} == set(all_specs()), "every registered kernel family must be built"
    assert failures(rows) == [], "\n".join(failures(rows))


def test_compile_cli_reports_unknown_kernel():
    from kla_tl.cli.compile import compile_all

    with pytest.raises(ValueError, match="unknown --kernel"):
        compile_all(archs=("sm_90a",), kernels=["no_such_kernel"])
