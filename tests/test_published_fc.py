"""published_fc.py (results/diagnostics/fc_published_tf): the authors' TensorFlow FC code on our data. Its checks of
their code need TensorFlow 2.15 (TF_PYTHON, or /work/tfenv/bin/python) and a clone of CSMMLab/DLRT-Net
(DLRT_NET_TF_REPO, or /work/.mirror's); CI has neither, and runs only the checks of the command line."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import python

HERE = Path(__file__).resolve().parents[1] / "results" / "diagnostics" / "fc_published_tf"
SCRIPT = HERE / "published_fc.py"
REPO = os.environ.get("DLRT_NET_TF_REPO", "/work/.mirror/CSMMLab+DLRT-Net/repo")
TF_PYTHON = os.environ.get("TF_PYTHON", "/work/tfenv/bin/python")
HAVE_CLONE = subprocess.run(["git", "-C", REPO, "cat-file", "-e", "9bd6e9e:tf_implementation/dlranet.py"],
                            capture_output=True).returncode == 0
HAVE_TF = Path(TF_PYTHON).exists() and subprocess.run([TF_PYTHON, "-c", "import tensorflow"],
                                                      capture_output=True).returncode == 0


def test_without_their_code_it_says_what_to_pass(tmp_path):
    result = python(SCRIPT, "train", "--repo", str(tmp_path), "--data", "x.npz", "--tau", "0.17", cwd=tmp_path)
    assert result.returncode != 0
    assert "pass a clone of github.com/CSMMLab/DLRT-Net as --repo" in result.stderr


@pytest.mark.skipif(not HAVE_CLONE, reason=f"no clone of CSMMLab/DLRT-Net at {REPO}")
def test_without_tensorflow_it_says_how_to_get_it(tmp_path):
    pytest.importorskip("torch")  # the project's Python, which has no TensorFlow
    if subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True).returncode == 0:
        pytest.skip("this Python has TensorFlow")
    result = python(SCRIPT, "train", "--repo", REPO, "--data", "x.npz", "--tau", "0.17", cwd=tmp_path)
    assert result.returncode != 0 and "tensorflow-cpu==2.15.1" in result.stderr


ROTATIONS = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    sys.path.insert(0, sys.argv[1])
    import published_fc as script

    dlranet = script.import_dlranet(script.their_source(sys.argv[2]))
    rng = np.random.default_rng(0)
    n, m, r2 = 30, 20, 10  # an augmented core of 2r = 10 after the S-step
    U = np.linalg.qr(rng.standard_normal((n, r2)))[0].astype(np.float32)
    Vt = np.linalg.qr(rng.standard_normal((m, r2)))[0].T.astype(np.float32)
    S = (rng.standard_normal((r2, r2)) * np.logspace(0, -3, r2)).astype(np.float32)
    W = U @ S @ Vt
    errors = {}
    for name, adapt in (("theirs", dlranet.DLRALayerAdaptive.rank_adaption), ("fixed", script.fixed_rank_adaption)):
        layer = type("Layer", (), {})()
        layer.s, layer.aux_U, layer.aux_Vt = tf.constant(S), tf.constant(U), tf.constant(Vt)
        layer.epsAdapt, layer.rmax_total = 0.05, 100
        adapt(layer)
        W1 = layer.aux_U.numpy() @ layer.s.numpy() @ layer.aux_Vt.numpy()
        sigma = np.linalg.svd(S, compute_uv=False)
        tail = np.linalg.norm(sigma[int(layer.low_rank):])
        errors[name] = (np.linalg.norm(W - W1), tail)
    print(errors)
    fixed_error, tail = errors["fixed"]
    assert abs(fixed_error - tail) <= 1e-5 * np.linalg.norm(S), errors  # the fix cuts only the tail
    assert errors["theirs"][0] > 2 * tail, errors  # theirs moves W far more than its cut (4x here)
    """)


@pytest.mark.skipif(not (HAVE_CLONE and HAVE_TF), reason="needs TensorFlow (TF_PYTHON) and a clone of CSMMLab/DLRT-Net")
def test_the_fixed_rotation_changes_w_by_the_truncated_tail_only_and_theirs_by_more(tmp_path):
    result = subprocess.run([TF_PYTHON, "-c", ROTATIONS, str(HERE), REPO], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
