"""Training-step speed: itmkit's SCAN t-i LSE and SGRAF-SGR against their official training steps, same batch,
same weights.

    python benchmarks/training.py --model scan --official /path/to/SCAN [--batch 128] [--repeats 3] [--threads 0]
    python benchmarks/training.py --model sgraf --official /path/to/SGRAF

One step is what a training iteration costs: encode B images (36 x 2048 random region features) and B
real Flickr30K captions (the 250 of ``shared/reference/pfan_sample``, tokenised with the F30K vocabulary
and sorted longest first as SCAN's loader sorts them), score the B x B block, the hinge loss with the
hardest negatives, backward, gradient clipping (2.0) and an Adam step.

``--official PATH`` is a local clone of the paper's repository (https://github.com/kuanghuei/SCAN,
https://github.com/Paranioar/SGRAF): its ``model.py`` is imported from there at run time, with the fixes
current PyTorch needs applied to its text in memory (nothing of it is copied into this project; each
Model's ``fixes`` say which and why): ``cap_emb.size(2)/2`` (a float slice index in Python 3) becomes
``//2``; SCAN's ``loss.data[0]`` (0-d tensors cannot be indexed) becomes ``loss.item()``; SGRAF's loss
defines its diagonal mask only when CUDA is there, so it is defined for the CPU too; torchvision, which
SCAN imports and never uses for precomputed features, is stubbed. The official model is built
with its train.py / opts.py defaults for the Flickr30K model (OPTIONS below), and its random initial
weights are converted into itmkit's model by ``itmkit import``'s own converter, so both start from the
same weights. Without ``--official`` the script stops and says so: there is no re-implemented stand-in.

Both sides run in this process with the same torch threads: one warm-up step each, then the best of
``--repeats`` steps (every step an optimizer step, so the weights move on; the time does not depend on
them). The first-step losses, both models in eval mode (SGRAF's dropout draws differ between two
implementations), must agree to 1e-5 (relative) or the record is refused. Writes
benchmarks/training_results.json under the model's key.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

import official as official_code
from common import record, run_context

HERE = Path(__file__).parent
RESULTS = HERE / "training_results.json"
SAMPLE = Path(os.environ.get("ITMKIT_SHARED", HERE.parents[1] / "shared")) / "reference"
REGIONS, FEATURES = 36, 2048

COMMON = dict(data_name="f30k_precomp", img_dim=FEATURES, embed_size=1024, word_dim=300, num_layers=1, bi_gru=True,
              no_imgnorm=False, no_txtnorm=False, margin=0.2, max_violation=True, grad_clip=2.0, learning_rate=2e-4,
              batch_size=128)


@attrs.frozen
class Model:
    """One paper's official training step and ours."""

    key: str  # the record's key
    title: str
    repository: str
    plugin: str  # the itmkit plugin whose importer converts the official weights
    official_class: str  # the model class of the official model.py
    options: dict  # the official opt: train.py / opts.py defaults of the Flickr30K model
    fixes: tuple[official_code.Fix, ...]  # what official_code (benchmarks/official.py) changes in the text of model.py, and why
    load: Callable[[Path], types.ModuleType]  # the official model.py of a clone


MODELS = {
    "scan": Model(
        "scan_t2i_lse", "SCAN t-i LSE (Flickr30K options: embed 1024, bi-GRU, lambda 9 / 6, clipped_l2norm, max"
        " violation)", "https://github.com/kuanghuei/SCAN", "itmkit_scan", "SCAN",
        dict(COMMON, precomp_enc_type="basic", cross_attn="t2i", raw_feature_norm="clipped_l2norm",
             agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0, num_epochs=30, lr_update=15),
        official_code.SCAN_MODEL_FIXES, official_code.scan_model),
    "sgraf": Model(
        "sgraf_sgr", "SGRAF-SGR (Flickr30K options: embed 1024, sim_dim 256, 3 reasoning steps, bi-GRU, max"
        " violation)", "https://github.com/Paranioar/SGRAF", "itmkit_sgraf", "SGRAF",
        dict(COMMON, sim_dim=256, module_name="SGR", sgr_step=3, num_epochs=40, lr_update=30),
        official_code.SGRAF_MODEL_FIXES,
        lambda clone: official_code.import_file(clone, "model.py", "sgraf_official_model", official_code.SGRAF_MODEL_FIXES,
                                           "https://github.com/Paranioar/SGRAF")),
}


class _NoLog:
    """The official model logs through train.py's LogCollector; the benchmark keeps nothing."""

    def update(self, *args, **kwargs) -> None:
        pass


def real_batch(batch: int, seed: int = 0):
    """(images (B, 36, 2048), token ids (B, L) zero-padded, lengths list) with SCAN's order: longest first."""
    from itmkit.data.vocab import Vocabulary

    vocab = Vocabulary.from_json(json.loads((SAMPLE / "f30k_precomp_vocab.json").read_text()))
    captions = (SAMPLE / "pfan_sample" / "train_caps.txt").read_text().splitlines()
    if batch > len(captions):
        raise SystemExit(f"--batch {batch}: the sample has {len(captions)} real captions")
    encoded = sorted((vocab.encode(c) for c in captions[:batch]), key=len, reverse=True)
    lengths = [len(e) for e in encoded]
    tokens = torch.zeros(batch, lengths[0], dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens[row, :len(ids)] = torch.tensor(ids)
    images = torch.rand(batch, REGIONS, FEATURES, generator=torch.Generator().manual_seed(seed))
    return vocab, images, tokens, lengths


def build_both(model: Model, clone: Path, vocab, seed: int = 0):
    """The official model (its own random init) and itmkit's, converted from the official weights."""
    import importlib

    from itmkit.build import build_model
    from itmkit.importing import OfficialCheckpoint
    from itmkit.recipe import parse_recipe

    convert = importlib.import_module(f"{model.plugin}.importer").convert
    torch.manual_seed(seed)
    opt = types.SimpleNamespace(vocab_size=len(vocab), **model.options)
    official_model = getattr(model.load(clone), model.official_class)(opt)
    official_model.logger = _NoLog()
    modules = [{k: v.clone() for k, v in m.state_dict().items()} for m in official_modules(official_model)]
    checkpoint = OfficialCheckpoint(f"official {model.official_class} (random init)", modules, vars(opt), None, None)
    converted = convert(checkpoint, vocab)
    ours = build_model(parse_recipe(converted.recipe), converted.data)
    missing, unexpected = ours.load_state_dict(converted.state, strict=False)
    if unexpected or missing:
        raise SystemExit(f"the converted weights do not fit: missing {missing}, unexpected {unexpected}")
    return official_model, ours


def official_modules(official) -> list[torch.nn.Module]:
    """The official model's modules in its state_dict order: [img_enc, txt_enc, (sim_enc)]."""
    return [m for m in (official.img_enc, official.txt_enc, getattr(official, "sim_enc", None)) if m is not None]


def official_loss(official, images, tokens, lengths) -> torch.Tensor:
    """The official loss of the batch, as its train_emb computes it before the backward pass."""
    embedded = official.forward_emb(images, tokens, lengths)
    if hasattr(official, "forward_sim"):  # SGRAF: a similarity network, then the loss of its matrix
        return official.criterion(official.forward_sim(*embedded))
    return official.criterion(*embedded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="scan")
    parser.add_argument("--official", type=Path, help="a local clone of the model's official repository")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # before this process's own work
    model = MODELS[args.model]
    if args.official is None:
        raise SystemExit(f"give --official PATH, a clone of {model.repository}: this benchmark times the official"
                         " training step itself and has no stand-in for it")
    if args.threads:
        torch.set_num_threads(args.threads)
    from itmkit.types import Regions, Tokens

    vocab, images, tokens, lengths = real_batch(args.batch)
    official, ours = build_both(model, args.official, vocab)
    ids = torch.arange(args.batch)
    regions, texts = Regions(images, torch.full((args.batch,), REGIONS)), Tokens(tokens, torch.tensor(lengths))
    optimizer = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=model.options["learning_rate"])

    # The first step's loss, both sides from the same weights (before any update), without dropout.
    official.val_start()
    ours.eval()
    with torch.no_grad():
        theirs = official_loss(official, images, tokens, lengths).item()
        mine = ours.training_step(regions, texts, ids, epoch=100).loss.item()
    difference = abs(mine - theirs) / max(abs(theirs), 1e-12)
    official.train_start()
    ours.train()

    def our_step() -> None:
        loss = ours.training_step(regions, texts, ids, epoch=100).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), model.options["grad_clip"])
        optimizer.step()

    def official_step() -> None:
        official.train_emb(images, tokens, lengths)

    timings = {}
    for name, step in (("official", official_step), ("itmkit", our_step)):
        step()  # warm
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    result = {
        "model": model.title,
        "official": f"{args.official} ({model.repository} model.py; fixes: " + "; ".join(w for _, _, w in model.fixes) + ")",
        "batch": args.batch,
        "caption_lengths": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "official_step_s": round(timings["official"], 3),
        "itmkit_step_s": round(timings["itmkit"], 3),
        "official_captions_per_s": round(args.batch / timings["official"], 1),
        "itmkit_captions_per_s": round(args.batch / timings["itmkit"], 1),
        "speedup": round(timings["official"] / timings["itmkit"], 2),
        "first_step_loss": {"official": theirs, "itmkit": mine, "relative_difference": difference},
        **run_context(load_before),
    }
    print(json.dumps(result, indent=2))
    if difference >= 1e-5:
        raise SystemExit(f"first-step losses differ by {difference:.2e} (relative): not recorded")
    record(RESULTS, model.key, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
