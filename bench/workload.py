"""Turn a real trace into model requests: identities → models, minutes → arrival times."""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

GB = 1_000_000_000

# Real local models (GGUF Q4_K_M unless noted): resident size in GB. Load time is size over a
# ~1.5 GB/s NVMe read plus ~1.5 s of engine start-up.
CATALOG_GB = [
    ("qwen/qwen3-1.7b", 1.9), ("google/gemma-3-4b", 3.3), ("qwen/qwen3-4b", 3.1),
    ("meta/llama-3.2-3b", 2.6), ("microsoft/phi-4-mini", 3.2), ("qwen/qwen3-8b", 5.6),
    ("meta/llama-3.1-8b", 5.4), ("mistral/ministral-8b", 5.5), ("google/gemma-3-12b", 9.4),
    ("mistral/mistral-nemo-12b", 8.1), ("microsoft/phi-4", 9.9), ("qwen/qwen3-14b", 10.0),
    ("openai/gpt-oss-20b", 13.5), ("mistral/devstral-24b", 15.2), ("google/gemma-3-27b", 17.9),
    ("qwen/qwen3-32b", 20.0),
]


@dataclass(frozen=True)
class Model:
    key: str
    size_gb: float
    load_s: float


@dataclass(frozen=True)
class Request:
    t_s: float
    model: str
    service_s: float


@dataclass
class Workload:
    name: str
    models: dict[str, Model]
    requests: list[Request]
    evaluate_from_s: float = 0.0     # delays are measured from here on (learning before)


def load_time_s(size_gb: float) -> float:
    return round(size_gb / 1.5 + 1.5, 2)


def tokens_per_s(size_gb: float) -> float:
    return max(10.0, min(150.0, 600.0 / size_gb))


def generated_tokens(trace_dir: Path) -> list[int]:
    path = trace_dir / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
    with path.open() as f:
        return [int(r["GeneratedTokens"]) for r in csv.DictReader(f)]


def from_azure_functions(inv_csv: Path, *, k: int, seed: int, mapping: str,
                         max_per_minute: int, minutes: int, trace_dir: Path) -> Workload:
    """K identities stratified by active minutes, mapped onto K models of the catalogue."""
    rng = random.Random(seed)
    with inv_csv.open() as f:
        reader = csv.reader(f)
        next(reader)
        rows = [(r[0], [int(x) for x in r[3:3 + minutes]]) for r in reader]
    rows = [r for r in rows if any(r[1])]
    rows.sort(key=lambda r: (sum(1 for x in r[1] if x), r[0]))
    strata = [rows[i * len(rows) // k:(i + 1) * len(rows) // k] for i in range(k)]
    chosen = [rng.choice(s) for s in strata if s]
    catalog = sorted(rng.sample(CATALOG_GB, k) if k <= len(CATALOG_GB) else
                     [rng.choice(CATALOG_GB) for _ in range(k)], key=lambda m: m[1])
    popularity = sorted(range(len(chosen)), key=lambda i: -sum(chosen[i][1]))
    if mapping == "random":
        order = list(range(len(chosen)))
        rng.shuffle(order)
    elif mapping == "popular-small":
        order = popularity
    elif mapping == "popular-large":
        order = list(reversed(popularity))
    else:
        raise ValueError(f"unknown mapping {mapping!r}")
    models: dict[str, Model] = {}
    assigned: dict[int, str] = {}
    for rank, ident in enumerate(order):
        key, size = catalog[rank]
        key = f"{key}#{rank}" if key in models else key
        models[key] = Model(key, size, load_time_s(size))
        assigned[ident] = key
    lengths = generated_tokens(trace_dir)
    requests = []
    for ident, (_, per_minute) in enumerate(chosen):
        m = models[assigned[ident]]
        for minute, count in enumerate(per_minute):
            for _ in range(min(count, max_per_minute)):
                service = rng.choice(lengths) / tokens_per_s(m.size_gb)
                requests.append(Request(minute * 60 + rng.random() * 60, m.key, service))
    requests.sort(key=lambda r: r.t_s)
    return Workload(f"{inv_csv.stem}:k{k}:s{seed}:{mapping}", models, requests)


def from_files(requests_csv: Path, catalog_csv: Path, default_service_s: float = 5.0
               ) -> Workload:
    """Explicit streams: requests `t_s,model[,prompt_tokens,completion_tokens]`, catalogue
    `model,size_gb,load_s`."""
    with catalog_csv.open() as f:
        models = {r["model"]: Model(r["model"], float(r["size_gb"]), float(r["load_s"]))
                  for r in csv.DictReader(f)}
    requests = []
    with requests_csv.open() as f:
        for r in csv.DictReader(f):
            if r["model"] not in models:
                raise ValueError(f"{requests_csv}: model {r['model']!r} is not in the catalogue")
            m = models[r["model"]]
            done = r.get("completion_tokens")
            service = int(done) / tokens_per_s(m.size_gb) if done else default_service_s
            requests.append(Request(float(r["t_s"]), m.key, service))
    requests.sort(key=lambda r: r.t_s)
    return Workload(requests_csv.stem, models, requests)
