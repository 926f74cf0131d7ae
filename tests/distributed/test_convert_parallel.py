"""HF checkpoints in TP2 and PP2 megatron models (gloo, 2 ranks): logits equal the HF model's,
whether loaded straight from HF weights or from the one-process torch_dist checkpoint (resharded
at load time). All cases run in one torchrun launch per layout (tests/distributed/convert_worker.py).
"""

import subprocess
import sys

import pytest

from tests.launch import ROOT, env, torchrun

pytestmark = pytest.mark.distributed

WORKER = "tests/distributed/convert_worker.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert")
    proc = subprocess.run([sys.executable, WORKER, "convert", str(out)], cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0 and "CONVERTED" in proc.stdout, proc.stdout[-6000:]
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_logits_match_hf_in_parallel_layouts(converted, tp, pp):
    proc = torchrun(2, WORKER, ["check", str(converted), "--tp", str(tp), "--pp", str(pp)],
                    timeout=240)
    assert f"CONVERT_PARALLEL_OK tp={tp} pp={pp}" in proc.stdout, proc.stdout[-6000:]
    # every case reported by the last stage, through both routes
    assert proc.stdout.count(" hf: max |logit diff|") >= 7 * tp
    assert proc.stdout.count(" checkpoint: max |logit diff|") >= 7 * tp
