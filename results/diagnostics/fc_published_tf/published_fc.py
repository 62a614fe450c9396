"""The authors' own rank-adaptive FC code (TensorFlow, github.com/CSMMLab/DLRT-Net at TF_COMMIT), run on our MNIST
split: do their ranks come out of their code on our data, and why do they stop where they do (issue 24, the FC rank
gap: results/ERRATA.md finding 6)?

Their model, layers, K/L/S pre- and post-processing and rank adaption are imported unchanged from
`tf_implementation/dlranet.py`; the training step is `mnist_DLRA.py:162-237` transcribed (`their_step`: three
forward/backward passes, one Keras Adam applied three times per batch). Their script reads MNIST with
`keras.datasets.mnist.load_data()` (a download) and fixes the width at 784; here the data come from an .npz that
`export-data` writes from dlrt's loader (the standard split: official training images 0-49999 train, 50000-59999
validation, the official test set), /255 as theirs, batched as theirs (`shuffle(buffer_size=1024).batch(256)`),
the shuffle seeded (theirs is not). Their factors come from Keras initializers without a seed, which
`tf.random.set_seed` does not pin here: two runs of the same command start from different draws (σ_1 of a layer's
first core differs by about 3 %).

    # once, with the project's Python (torch): our split as arrays
    python results/diagnostics/fc_published_tf/published_fc.py export-data --out /tmp/mnist_standard.npz
    # with a Python that has TensorFlow 2.15 (tensorflow-cpu==2.15.1; their requirements.txt says 2.8, which has no
    # wheel for Python 3.11; 2.15's tf.keras.optimizers.legacy.Adam is 2.8's Adam)
    python results/diagnostics/fc_published_tf/published_fc.py train --repo DLRT-Net-TF --data /tmp/mnist_standard.npz \
        --tau 0.17 --epochs 80 [--fix rotation]
    # what its rank adaption sees (σ_1, σ_r, σ_r+1, ϑ‖σ‖ per layer) at a few batches
    python results/diagnostics/fc_published_tf/published_fc.py spectrum --repo DLRT-Net-TF --data /tmp/mnist_standard.npz \
        --tau 0.17 [--fix rotation]

--fix rotation: their rank_adaption with V rotated by the first r columns of the core's right singular vectors
(theirs takes the first r rows of tf.linalg.svd's v, dlranet.py:545, the defect ERRATA finding 4 names), nothing else
changed. A run folder holds epochs.csv (per epoch: the last batch's loss, validation and test loss and accuracy over
all images, the four ranks, seconds) and, once finished, summary.json. A run is not resumable (their layers hold no
state that a checkpoint of ours could restore faithfully): an interrupted run starts again.

One difference from their code is needed here and changes no number: Adam keeps two slots for every variable it
has seen, and their layers make new K, L and S variables in every batch, so their runs held 61-73 GB of slots for
dead variables (ERRATA finding 4). `forget_dead_slots` drops the slots of variables no longer in the model after each
step; a live variable's slots and Adam's step count are untouched.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TF_COMMIT = "9bd6e9e"  # the TensorFlow code ERRATA finding 4 reads
WIDTH, START_RANK, MAX_RANK = 500, 350, 350  # their width-500 runs: folders e2edense_sr350_v<ϑ>, max_rank 350 (mnist_DLRA.py:108)
BATCH, SHUFFLE_BUFFER, LR = 256, 1024, 1e-3  # mnist_DLRA.py:87, 141, 115
COLUMNS = ["epoch", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "ranks", "rank_0", "rank_1",
           "rank_2", "rank_3", "seconds"]


def export_data(args) -> None:
    """MNIST as dlrt reads it, split as theirs and our standard split are (training images 0-49999 train,
    50000-59999 validation, the official test set), as uint8 rows of 784 pixels and int labels in an .npz."""
    import numpy as np

    from dlrt.experiments.data.sources import mnist_raw

    raw = mnist_raw(Path(args.root))
    x_train, y_train = raw["train_x"].reshape(-1, 784).numpy(), raw["train_y"].numpy()
    arrays = {"x_train": x_train[:50000], "y_train": y_train[:50000], "x_val": x_train[50000:],
              "y_val": y_train[50000:], "x_test": raw["test_x"].reshape(-1, 784).numpy(), "y_test": raw["test_y"].numpy()}
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items()))


def their_source(repo: str) -> str:
    """The text of their tf_implementation/dlranet.py at TF_COMMIT."""
    shown = subprocess.run(["git", "-C", repo, "show", f"{TF_COMMIT}:tf_implementation/dlranet.py"],
                           capture_output=True, text=True)
    if shown.returncode:
        sys.exit(f"published_fc.py: {repo} does not hold {TF_COMMIT}:tf_implementation/dlranet.py: pass a clone of "
                 "github.com/CSMMLab/DLRT-Net as --repo")
    return shown.stdout


def import_dlranet(source: str):
    """Their dlranet.py (its text), imported from a temporary copy."""
    folder = Path(tempfile.mkdtemp(prefix="dlranet-"))
    (folder / "dlranet.py").write_text(source)
    spec = importlib.util.spec_from_file_location("dlranet", folder / "dlranet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixed_rank_adaption(self):
    """dlranet.py:523-547 (DLRALayerAdaptive.rank_adaption) with V rotated by the columns of v: Vt <- v[:, :r]^T Vt,
    the transpose of V <- V v[:, :r]. Theirs: Vt <- v[:r, :] Vt."""
    import tensorflow as tf

    d, u2, v2 = tf.linalg.svd(self.s)
    tol = self.epsAdapt * tf.linalg.norm(d)
    rmax = int(tf.floor(d.shape[0] / 2))
    for j in range(0, 2 * rmax - 1):
        tmp = tf.linalg.norm(d[j:2 * rmax - 1])
        if tmp < tol:
            rmax = j
            break
    rmax = tf.minimum(rmax, self.rmax_total)
    rmax = tf.maximum(rmax, 2)
    self.s = tf.linalg.tensor_diag(d[:rmax])
    self.aux_U = tf.matmul(self.aux_U, u2[:, :rmax])
    self.aux_Vt = tf.matmul(tf.transpose(v2[:, :rmax]), self.aux_Vt)  # theirs: tf.matmul(v2[:rmax, :], self.aux_Vt)
    self.low_rank = rmax
    return 0


def blocks(model) -> list:
    return [model.dlraBlockInput, model.dlraBlock1, model.dlraBlock2, model.dlraBlock3]


def their_step(model, optimizer, loss_fn, x, y):
    """One batch of mnist_DLRA.py:162-237 (TF_COMMIT), in their order; returns the S-step's loss."""
    import tensorflow as tf

    for block in blocks(model):
        block.k_step_preprocessing()
        block.l_step_preprocessing()
    model.toggle_non_s_step_training()
    grads = []
    for step in (0, 1):  # the K-step's and the L-step's gradients, both taken before either is applied
        with tf.GradientTape() as tape:
            out = tf.keras.activations.softmax(model(x, step=step, training=True))
            loss = loss_fn(y, out) + sum(model.losses)
        step_grads = tape.gradient(loss, model.trainable_weights)
        model.set_none_grads_to_zero(step_grads, model.trainable_weights)
        model.set_dlra_bias_grads_to_zero(step_grads)
        grads.append(step_grads)
    optimizer.apply_gradients(zip(grads[0], model.trainable_weights))
    optimizer.apply_gradients(zip(grads[1], model.trainable_weights))
    for block in blocks(model):
        block.k_step_postprocessing_adapt()
        block.l_step_postprocessing_adapt()
    for block in blocks(model):
        block.s_step_preprocessing()
    model.toggle_s_step_training()
    with tf.GradientTape() as tape:
        out = tf.keras.activations.softmax(model(x, step=2, training=True))
        loss = loss_fn(y, out) + sum(model.losses)
    s_grads = tape.gradient(loss, model.trainable_weights)
    model.set_none_grads_to_zero(s_grads, model.trainable_weights)
    optimizer.apply_gradients(zip(s_grads, model.trainable_weights))
    for block in blocks(model):
        block.rank_adaption()
    return float(loss)


def forget_dead_slots(optimizer, model) -> int:
    """Drop Adam's slots of variables the model no longer holds (their K, L, S of earlier batches); returns how many
    variables' slots were dropped. The math is unchanged: a dropped variable is never applied again."""
    from keras.src.optimizers.legacy.optimizer_v2 import _var_key

    live = {_var_key(v) for v in model.weights}
    dead = [key for key in optimizer._slots if key not in live]
    dropped = set()
    for key in dead:
        dropped.update(id(slot) for slot in optimizer._slots.pop(key).values())
    optimizer._weights = [w for w in optimizer._weights if id(w) not in dropped]
    return len(dead)


def evaluate(model, loss_fn, x, y) -> tuple[float, float]:
    """mnist_DLRA.py:257-290: K = U S, then the K-step's forward over all images; (loss, accuracy in %)."""
    import tensorflow as tf

    for block in blocks(model):
        block.k_step_preprocessing()
    out = tf.keras.activations.softmax(model(x, step=0, training=False))
    accuracy = float(tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out, 1), y), tf.float32)))
    return float(loss_fn(y, out)), 100 * accuracy


def run_name(tau: float, seed: int, fixes: list[str]) -> str:
    return f"fc500-published-tf-tau{tau:g}-seed{seed}" + "".join(f"-fix-{fix}" for fix in fixes)


def import_tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        sys.exit("published_fc.py: this Python has no TensorFlow: run it with one that has tensorflow-cpu==2.15.1 "
                 "(python -m venv tfenv && tfenv/bin/pip install tensorflow-cpu==2.15.1)")
    return tf


def load_their_code(args):
    """TensorFlow on args.threads threads, and their dlranet module from args.repo."""
    source = their_source(args.repo)
    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    return tf, import_dlranet(source)


def their_run(args, dlranet):
    """Our data as their script prepares it (/255), and, drawn from args.seed, their model, Adam and loss and the
    training batches as their script makes them: images, labels (per split), model, optimizer, loss_fn, batches."""
    import numpy as np
    import tensorflow as tf

    data = np.load(args.data)
    images = {split: tf.cast(data[f"x_{split}"], tf.float32) / 255.0 for split in ("train", "val", "test")}
    labels = {split: tf.constant(data[f"y_{split}"]) for split in ("train", "val", "test")}
    tf.random.set_seed(args.seed)
    model = dlranet.DLRANetAdaptive(input_dim=784, output_dim=10, low_rank=START_RANK, dlra_layer_dim=WIDTH,
                                    tol=args.tau, rmax_total=MAX_RANK)
    optimizer = tf.keras.optimizers.legacy.Adam(learning_rate=LR)  # TF 2.8's tf.keras.optimizers.Adam
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    batches = tf.data.Dataset.from_tensor_slices((images["train"], labels["train"]))
    batches = batches.shuffle(buffer_size=SHUFFLE_BUFFER, seed=args.seed).batch(BATCH)
    return images, labels, model, optimizer, loss_fn, batches


def train(args) -> None:
    tf, dlranet = load_their_code(args)
    if "rotation" in args.fix:
        dlranet.DLRALayerAdaptive.rank_adaption = fixed_rank_adaption
    folder = Path(args.out) / run_name(args.tau, args.seed, args.fix)
    if (folder / "summary.json").exists():
        print(f"{folder}: finished already")
        return
    folder.mkdir(parents=True, exist_ok=True)
    images, labels, model, optimizer, loss_fn, batches = their_run(args, dlranet)

    with open(folder / "epochs.csv", "w") as log:
        log.write(",".join(COLUMNS) + "\n")
    rows = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        for step, (x, y) in enumerate(batches):
            loss = their_step(model, optimizer, loss_fn, x, y)
            forget_dead_slots(optimizer, model)
            if args.steps and step + 1 >= args.steps:
                break
        seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, loss_fn, images["val"], labels["val"])
        test_loss, test_acc = evaluate(model, loss_fn, images["test"], labels["test"])
        ranks = [int(block.low_rank) for block in blocks(model)]
        row = dict(epoch=epoch, train_loss=loss, val_loss=val_loss, val_acc=val_acc, test_loss=test_loss,
                   test_acc=test_acc, ranks=" ".join(map(str, ranks)), seconds=round(seconds, 2),
                   **{f"rank_{i}": r for i, r in enumerate(ranks)})
        rows.append(row)
        with open(folder / "epochs.csv", "a") as log:
            log.write(",".join(str(row[c]) for c in COLUMNS) + "\n")
        print(f"epoch {epoch}/{args.epochs}: loss {loss:.4f} val acc {val_acc:.2f} test acc {test_acc:.2f} "
              f"ranks {ranks} {seconds:.1f}s", flush=True)
    summary = {"status": "completed", "tau": args.tau, "seed": args.seed, "fixes": args.fix, "epochs": args.epochs,
               "final": rows[-1], "published": f"CSMMLab/DLRT-Net at {TF_COMMIT}", "tensorflow": tf.__version__,
               "command": " ".join(sys.argv)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def spectrum(args) -> None:
    """Their code up to the last of the --at batches, printing at each of them, per layer, what its rank adaption
    sees: the rank r, the augmented core's singular values σ_1, σ_r (the smallest carried one), σ_r+1 (the largest
    new one), how flat the carried ones are (σ_r over their root mean square), the tolerance ϑ‖σ‖, and where the cut
    falls."""
    import numpy as np

    tf, dlranet = load_their_code(args)
    adapt = fixed_rank_adaption if "rotation" in args.fix else dlranet.DLRALayerAdaptive.rank_adaption
    seen = []

    def watched(self):
        sigma = tf.linalg.svd(self.s, compute_uv=False).numpy()
        r = int(self.low_rank)
        rms = np.sqrt(np.mean(np.square(sigma[:r])))
        seen.append((r, sigma[0], sigma[r - 1], sigma[r], rms, self.epsAdapt * np.linalg.norm(sigma)))
        adapt(self)
        seen[-1] += (int(self.low_rank),)

    dlranet.DLRALayerAdaptive.rank_adaption = watched
    _, _, model, optimizer, loss_fn, batches = their_run(args, dlranet)
    print(f"their code{' with the V rotation fixed' if args.fix else ''}, ϑ = {args.tau:g}, seed {args.seed}: per layer "
          "the rank r before the cut, the core's σ_1, σ_r, σ_r+1, σ_r / σ_1, σ_r / rms(σ_1..σ_r), ϑ‖σ‖ and the rank "
          "after the cut")
    for step, (x, y) in enumerate(batches.repeat(), 1):  # reshuffled each pass
        their_step(model, optimizer, loss_fn, x, y)
        forget_dead_slots(optimizer, model)
        if step in args.at:
            for layer, (r, first, last_kept, first_new, rms, tol, cut) in enumerate(seen[-4:], 1):
                print(f"step {step:4d} layer {layer}: r {r:3d}  σ_1 {first:.3f}  σ_r {last_kept:.3f}  σ_r+1 {first_new:.4f}"
                      f"  σ_r/σ_1 {last_kept / first:.2f}  σ_r/σ_rms {last_kept / rms:.2f}  ϑ‖σ‖ {tol:.3f}  -> rank {cut}",
                      flush=True)
        if step >= max(args.at):
            break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export-data", help="our standard MNIST split as an .npz (the project's Python)")
    export.add_argument("--root", default="data")
    export.add_argument("--out", required=True)
    run = commands.add_parser("train", help="their code on that data (a Python with TensorFlow)")
    run.add_argument("--repo", required=True, help="a clone or git directory of CSMMLab/DLRT-Net")
    run.add_argument("--data", required=True, help="the .npz of export-data")
    run.add_argument("--tau", type=float, required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--epochs", type=int, default=250)
    run.add_argument("--steps", type=int, default=0, help="batches per epoch (0: all; fewer for a quick check)")
    run.add_argument("--fix", nargs="*", default=[], choices=["rotation"])
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", default=str(Path(__file__).resolve().parent))
    watch = commands.add_parser("spectrum", help="what their rank adaption sees in the first batches")
    watch.add_argument("--repo", required=True)
    watch.add_argument("--data", required=True)
    watch.add_argument("--tau", type=float, required=True)
    watch.add_argument("--seed", type=int, default=0)
    watch.add_argument("--at", type=int, nargs="+", default=[1, 20, 60, 150, 1000])
    watch.add_argument("--fix", nargs="*", default=[], choices=["rotation"])
    watch.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    {"export-data": export_data, "train": train, "spectrum": spectrum}[args.command](args)


if __name__ == "__main__":
    main()
