"""``pyrosweep demo``: the whole loop on embedded defaults (local Ray, the embedded MLflow
store, local Serve): prepare ``jsb``, run a small sweep of each of two families (``hmm``,
``nnhmm``), promote the family whose best trial wins on the validation chorales, serve it
on 127.0.0.1, score and decode two test chorales over HTTP, stream one through the filter
with p-values, forecast the frames after it, read the drift monitor, shut everything down."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from trainables.data import dataset_summary, load_dataset

from .home import tracking_uri
from .mlflow_layout import SweepTracker
from .promote import promote
from .remote import ray_session
from .serving import ServeOptions, serving
from .sweep import SweepOutcome, run_sweep
from .sweep_file import load_sweep_file

DEMO_SWEEPS = [Path(__file__).resolve().parents[1] / "configs" / name for name in ("demo.yaml", "demo-nnhmm.yaml")]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _stream(url: str, frames: list, chunk: int) -> list[dict]:
    """The ``/v1/filter`` answers of ``frames`` sent ``chunk`` at a time, with p-values."""
    answers: list[dict] = []
    for start in range(0, len(frames), chunk):
        state = {"state": answers[-1]["state"]} if answers else {}
        answers.append(_post(f"{url}/v1/filter", {"frames": frames[start : start + chunk], "pvalues": True, **state}))
    return answers


def _winner(outcomes: dict[str, SweepOutcome]) -> str:
    """The sweep whose best trial has the lower validation NLL, said with the paired 95%
    interval of the difference over the same validation chorales."""
    (first, a), (second, b) = outcomes.items()
    tracker = SweepTracker(a.tracking_uri, first)
    scores = [tracker.held_out(tracker.client.get_run(outcome.best["run_id"])) for outcome in (a, b)]
    comparison = scores[1].compare(scores[0], "valid")
    winner, loser = (second, first) if comparison.difference < 0 else (first, second)
    verdict = "tied on these chorales" if comparison.tied else f"{winner} wins"
    print(f"\n   {second} minus {first} on the same {comparison.n} validation chorales: "
          f"{comparison.describe()} nats per frame (95% CI): {verdict}; promoting {winner}")
    return winner


def run_demo(port: int = 8000) -> None:
    started = time.perf_counter()
    data = load_dataset("jsb")
    print("1. data: jsb (Bach chorales from music21, 88-key piano rolls)")
    for row in dataset_summary(data):
        print(f"   {row['split']:5s} {row['sequences']:4d} chorales, {row['frames']:6d} frames")

    with ray_session(None, tracking_uri()):  # one local Ray for the sweeps and for Serve
        outcomes = {}
        for path in DEMO_SWEEPS:
            spec = load_sweep_file(path)
            print(f"\n2. sweep {spec.name} ({path.name}, {spec.model}) on a local Ray ...", flush=True)
            outcomes[spec.name] = outcome = run_sweep(spec)
            best = outcome.best
            states = best.get("hidden_dim", spec.search.get("hidden_dim"))  # a row has the searched keys
            print(f"   best trial {best['trial']}: hidden_dim {states}, valid NLL "
                  f"{best['best_valid_nll']:.3f}, test NLL {best['test_nll']:.3f} nats per frame")
        name = _winner(outcomes)
        outcome = outcomes[name]
        promoted = promote(outcome.tracking_uri, name)
        model_uri = f"models:/{promoted['name']}@{promoted['alias']}"
        print(f"\n3. promoted: {model_uri} -> version {promoted['version']}")

        test = data.splits["test"]
        body = {"sequences": [test.x[n, : int(test.lengths[n])].int().tolist() for n in range(2)]}
        options = ServeOptions(model=model_uri, tracking_uri=outcome.tracking_uri, port=port)
        with serving(options):
            url = f"http://127.0.0.1:{port}"
            print(f"\n4. serving {model_uri} on {url}; two test chorales:", flush=True)
            scored = _post(f"{url}/v1/score", body)
            decoded = _post(f"{url}/v1/decode", body)
            streamed = _stream(url, body["sequences"][0], chunk=8)
            forecast = _post(f"{url}/v1/forecast", {"state": streamed[-1]["state"], "horizon": 4})
            with urllib.request.urlopen(f"{url}/v1/monitor", timeout=60) as response:
                monitor = json.load(response)
    for n, (log_likelihood, states) in enumerate(zip(scored["log_likelihood"], decoded["states"])):
        frames = len(states)
        print(f"   chorale {n}: {frames} frames, log_likelihood {log_likelihood:.2f} nats "
              f"({-log_likelihood / frames:.3f} per frame)")
        print(f"      Viterbi states: {' '.join(map(str, states[:24]))}{' ...' if frames > 24 else ''}")
    steps = [step for answer in streamed for step in answer["per_step"]]
    pvalues = sorted(p for answer in streamed for p in answer["pvalues"])
    print(f"   chorale 0 as a stream, 8 frames a request (/v1/filter): log_likelihood {sum(steps):.2f} nats, "
          f"median p-value {pvalues[len(pvalues) // 2]:.2f} against the validation frames")
    keys = ", ".join(f"{sum(frame):.1f}" for frame in forecast["mean"])
    print(f"   forecast of the next 4 frames (/v1/forecast): expected keys down {keys}")
    print(f"   monitor (/v1/monitor): {monitor['window']} recent frames vs {monitor['reference_frames']} validation "
          f"frames, KS statistic {monitor['statistic']:.3f}, drifted: {monitor['drifted']}")
    print("\n5. served and shut down. Browse the runs:")
    print(f"   pyrosweep runs --experiment {name}    or    pyrosweep ui   (store: {tracking_uri()})")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
