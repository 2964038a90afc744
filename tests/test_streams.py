"""Streams over real HTTP: ``/v1/filter`` chunk by chunk and ``/v1/forecast`` on a real
Ray Serve app (loopback), against the batch answers of the same model in float64 and
against direct computations from its parameters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import ray
import torch
from ray import serve

from cluster.serving import ServeOptions, deployment
from helpers import free_port, get, post
from serve.monitor import MIN_FRAMES, write_reference
from test_serve import request_inputs, trained_checkpoint
from trainables import streaming
from trainables.checkpoint import load_checkpoint
from trainables.data import load_dataset

pytestmark = pytest.mark.slow

APPS = {"hmm": 2, "arhmm": 1, "gaussian-hmm": 1, "dmm": 1, "gmm": 1}  # family -> replicas
REFERENCE_SEED, HELD_OUT_SEED = 11, 12  # draws from the hmm behind its reference, and new ones
LAG = 3
FLEET_KEY = "one key for every app of the module"
F32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Each family of ``APPS`` served under ``/<family>`` (hmm by two replicas), and a
    second hmm version under ``/hmm-v2``, all with one stream key (a fleet's); yields
    base URL and checkpoints."""
    directory = tmp_path_factory.mktemp("checkpoints")
    metrics_port = free_port()
    ray.init(address="local", num_cpus=sum(APPS.values()) + 3, include_dashboard=False, configure_logging=False, _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    checkpoints = {family: trained_checkpoint(directory, family) for family in APPS}
    checkpoints["hmm-v2"] = trained_checkpoint(directory, "hmm", seed=1)
    checkpoints["hmm-ref"] = shutil.copytree(checkpoints["hmm"], directory / "hmm-ref")
    model = load_checkpoint(checkpoints["hmm-ref"])
    x, _ = model.sample(100, 10, seed=REFERENCE_SEED)
    write_reference(model, x, torch.full((100,), 10), checkpoints["hmm-ref"])
    for name, source in checkpoints.items():
        replicas = APPS.get(name, 1)
        options = ServeOptions(model=str(source), tracking_uri="", replicas=replicas, stream_key=FLEET_KEY)
        serve.run(deployment(options, {"source": str(source), "tracking_uri": ""}), name=name, route_prefix=f"/{name}")
    yield {"base": f"http://127.0.0.1:{port}", "checkpoints": checkpoints, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


def sequence(family: str) -> list[list[float | None]]:
    """The longest test sequence of the family's data set, as JSON frames."""
    body, _ = request_inputs(family)
    return max(body["sequences"], key=len)


def streamed(url: str, frames: list, chunk: int, lag: int | None = LAG) -> dict[str, list]:
    """``frames`` sent to ``url``'s ``/v1/filter`` in chunks of ``chunk``: the answers'
    fields joined, and the replicas that answered."""
    joined = {"filtered": [], "per_step": [], "smoothed": [], "replicas": []}
    state = None
    for start in range(0, len(frames), chunk):
        body = {"frames": frames[start : start + chunk], **({"state": state} if state else {"lag": lag})}
        request = urllib_request(f"{url}/v1/filter", body)
        with request as response:
            answer = json.load(response)
            joined["replicas"].append(response.headers["x-pyrosweep-replica"])
        assert answer["frames_seen"] == min(start + chunk, len(frames)) and answer["lag"] == (lag or 0)
        for name in ("filtered", "per_step", "smoothed"):
            joined[name] += answer[name]
        state = answer["state"]
    joined["state"] = state
    return joined


def urllib_request(url: str, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=60)


def as_x(frames: list) -> torch.Tensor:
    """JSON frames (null: missing) as ``x`` ``(1, T, D)`` float64, NaN where missing."""
    return torch.tensor([[np.nan if v is None else v for v in frame] for frame in frames], dtype=torch.float64)[None]


def prefixes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prefix ``x[:, :t+1]`` of one sequence ``(1, T, D)`` as a batch ``(T, T, D)`` with lengths."""
    T = x.shape[1]
    batch = x.expand(T, -1, -1).clone()
    return batch, torch.arange(1, T + 1)


@pytest.mark.parametrize("family", ["hmm", "arhmm", "gaussian-hmm"])
def test_chunks_of_any_size_give_the_batch_answers(server, family):
    """Chunks of 1, 7 and all frames give the same filtered probabilities, increments and
    fixed-lag marginals, equal to the float64 batch answers: per_step to the score's
    steps, filtered to the posterior of each prefix at its last frame, smoothed to it at
    frame t - lag; and to the served (float32) score within its rounding."""
    url = f"{server['base']}/{family}"
    frames = sequence(family)
    if family == "gaussian-hmm":  # missing values, integrated out exactly
        frames = [[None, frame[1]] if t % 4 == 1 else frame for t, frame in enumerate(frames)]
    runs = [streamed(url, frames, chunk) for chunk in (1, 7, len(frames))]
    for run in runs[1:]:
        for name in ("filtered", "per_step", "smoothed"):
            np.testing.assert_allclose(run[name], runs[0][name], rtol=0, atol=1e-9)

    model = load_checkpoint(server["checkpoints"][family]).double()
    x = as_x(frames)
    T = x.shape[1]
    steps = model.log_likelihood_steps(x, torch.tensor([T]))[0].detach()
    np.testing.assert_allclose(runs[0]["per_step"], steps.tolist(), rtol=0, atol=1e-9)
    marginals = model.posterior(*prefixes(x)).marginals  # (T prefixes, T, K)
    ends = torch.arange(T)
    np.testing.assert_allclose(runs[0]["filtered"], marginals[ends, ends].tolist(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(runs[0]["smoothed"], marginals[ends[LAG:], ends[:-LAG]].tolist(), rtol=0, atol=1e-9)

    status, scored = post(f"{url}/v1/score", {"sequences": [frames]})
    assert status == 200
    scale = float(steps.detach().abs().sum())
    assert abs(scored["log_likelihood"][0] - sum(runs[0]["per_step"])) <= 8 * F32 * scale


def test_chunks_answered_by_either_replica_agree(server):
    """One stream's chunks go to whichever replica Serve picks (no sticky sessions): both
    answer it, with the same results as one request."""
    url = f"{server['base']}/hmm"
    frames = sequence("hmm")
    chunked = streamed(url, frames * 3, 1)
    assert len(set(chunked["replicas"])) == 2, chunked["replicas"]
    whole = streamed(url, frames * 3, len(frames) * 3)
    for name in ("filtered", "per_step", "smoothed"):
        np.testing.assert_allclose(chunked[name], whole[name], rtol=0, atol=1e-9)


def test_tokens_are_bound_to_the_version_and_the_key(server):
    frames = sequence("hmm")
    status, first = post(f"{server['base']}/hmm/v1/filter", {"frames": frames[:3]})
    assert status == 200
    token = first["state"]
    status, answer = post(f"{server['base']}/hmm-v2/v1/filter", {"frames": frames[3:5], "state": token})
    assert status == 409 and "made by model" in answer["detail"], answer  # another version, the same key
    payload, signature = token.split(".")
    tampered = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    for bad in (f"{tampered}.{signature}", f"{payload}.{signature[::-1]}", "not-a-token", ""):
        status, answer = post(f"{server['base']}/hmm/v1/filter", {"frames": frames[3:5], "state": bad})
        assert status == 409 and "not a token this server signed" in answer["detail"], answer
    status, answer = post(f"{server['base']}/hmm/v1/filter", {"frames": frames[3:5], "state": token, "lag": 2})
    assert status == 422 and "this stream's lag is 0" in answer["detail"]
    assert post(f"{server['base']}/hmm/v1/filter", {"frames": frames[3:5], "state": token})[0] == 200


def test_a_signed_token_from_another_deployment_key_is_refused(server):
    """The same checkpoint behind another key (another server of no fleet): 409."""
    source = str(server["checkpoints"]["hmm"])
    options = ServeOptions(model=source, tracking_uri="", stream_key="another key")
    serve.run(deployment(options, {"source": source, "tracking_uri": ""}), name="other-key", route_prefix="/other-key")
    frames = sequence("hmm")
    token = post(f"{server['base']}/hmm/v1/filter", {"frames": frames[:3]})[1]["state"]
    status, answer = post(f"{server['base']}/other-key/v1/filter", {"frames": frames[3:], "state": token})
    serve.delete("other-key")
    assert status == 409 and "signed by another deployment's key" in answer["detail"]


BAD_STREAMS = [
    ("hmm", "filter", {}, 422, "body: expected a JSON object with 'frames'"),
    ("hmm", "filter", {"frames": []}, 422, "frames: expected a non-empty list"),
    ("hmm", "filter", {"frames": [[0] * 7]}, 422, "frames[0]: expected 8 values, got 7"),
    ("hmm", "filter", {"frames": [[0] * 8], "lag": 101}, 422, "lag: input should be less than or equal to 100"),
    ("hmm", "filter", {"frames": [[0] * 8], "state": 3}, 422, "state: input should be a valid string"),
    ("hmm", "filter", {"frames": [[0] * 8], "window": 3}, 422, "window: unknown field"),
    ("hmm", "forecast", {"horizon": 2}, 422, "frames: missing"),
    ("hmm", "forecast", {"frames": [[0] * 8], "horizon": 0}, 422, "horizon: input should be greater than or equal to 1"),
    ("hmm", "forecast", {"frames": [[0] * 8], "horizon": 1000, "num_samples": 1000}, 413, "the limit is"),
    ("dmm", "filter", {"frames": [[0] * 8]}, 422, "dmm: its latents are continuous"),
    ("gmm", "forecast", {"frames": [[0, 0]], "horizon": 1}, 422, "gmm: a model of points"),
]


@pytest.mark.parametrize("family, method, body, status, detail", BAD_STREAMS)
def test_bad_stream_requests_get_a_4xx_that_says_what(server, family, method, body, status, detail):
    url = f"{server['base']}/{family}"
    answer_status, answer = post(f"{url}/v1/{method}", body)
    assert answer_status == status and detail in answer["detail"], answer
    assert get(f"{url}/healthz")[0] == 200


def direct_forecast(params: dict, filtered: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """State probabilities ``(H, K)`` and key probabilities ``(H, D)`` from the parameters
    of an ``hmm`` (``/v1/model``) and the filtering distribution at the last frame."""
    transition, emission = np.array(params["transition"]), np.array(params["emission_probs"])
    probs = [filtered @ transition]
    for _ in range(1, horizon):
        probs.append(probs[-1] @ transition)
    probs = np.stack(probs)
    return probs, probs @ emission


def test_forecasts_equal_a_direct_computation_from_the_parameters(server):
    url = f"{server['base']}/hmm"
    params = get(f"{url}/v1/model")[1]["parameters"]
    frames = sequence("hmm")
    filtered = np.array(streamed(url, frames, len(frames), lag=None)["filtered"][-1])
    for horizon in range(1, 6):
        status, answer = post(f"{url}/v1/forecast", {"frames": frames, "horizon": horizon})
        assert status == 200 and answer["mean_exact"] and "samples" not in answer
        probs, mean = direct_forecast(params, filtered, horizon)
        tolerance = 64 * F32  # the served parameters are float32
        np.testing.assert_allclose(answer["state_probs"], probs, rtol=0, atol=tolerance)
        np.testing.assert_allclose(answer["mean"], mean, rtol=0, atol=tolerance)
    token = post(f"{url}/v1/filter", {"frames": frames})[1]["state"]
    from_state = post(f"{url}/v1/forecast", {"state": token, "horizon": 5})[1]
    assert from_state["frames_seen"] == len(frames)
    np.testing.assert_allclose(from_state["state_probs"], answer["state_probs"], rtol=0, atol=1e-12)


def test_forecast_samples_are_seeded_and_follow_the_forecast(server):
    url = f"{server['base']}/hmm"
    frames = sequence("hmm")
    body = {"frames": frames, "horizon": 3, "num_samples": 1000, "seed": 7}
    first, again = post(f"{url}/v1/forecast", body)[1], post(f"{url}/v1/forecast", body)[1]
    other = post(f"{url}/v1/forecast", {**body, "seed": 8})[1]
    samples = np.array(first["samples"])
    assert samples.shape == (1000, 3, 8) and set(np.unique(samples)) <= {0.0, 1.0}
    assert first["samples"] == again["samples"] and first["samples"] != other["samples"]
    # seed 7's draws (fixed): each key's share of ones within 5 standard errors of its mean
    mean = np.array(first["mean"])
    error = np.sqrt(mean * (1 - mean) / 1000)
    assert np.all(np.abs(samples.mean(0) - mean) <= 5 * error + 1e-12)


def test_an_autoregressive_forecast_is_exact_one_step_ahead(server):
    """arhmm's keys read the previous frame: its first step's mean is exact (given the
    last frame), later ones averages of draws, and it says so."""
    url = f"{server['base']}/arhmm"
    params = get(f"{url}/v1/model")[1]["parameters"]
    frames = sequence("arhmm")
    filtered = np.array(streamed(url, frames, len(frames), lag=None)["filtered"][-1])
    answer = post(f"{url}/v1/forecast", {"frames": frames, "horizon": 2})[1]
    assert not answer["mean_exact"]
    emission = np.array(params["emission_probs"])  # (K, 2, D)
    last = np.array(frames[-1], dtype=int)
    step = filtered @ np.array(params["transition"])
    mean = step @ emission[:, last, np.arange(len(last))]
    np.testing.assert_allclose(answer["mean"][0], mean, rtol=0, atol=64 * F32)
    assert post(f"{url}/v1/forecast", {"frames": frames, "horizon": 1})[1]["mean_exact"]


def test_the_stream_engine_in_process_equals_the_served_answers(server):
    """``trainables.streaming`` is what the route runs: the same numbers in process."""
    model = streaming.streaming_model(load_checkpoint(server["checkpoints"]["hmm"]))
    frames = sequence("hmm")
    chunk = streaming.filter_chunk(model, as_x(frames)[0], streaming.start(model, LAG))
    served = streamed(f"{server['base']}/hmm", frames, 5)
    np.testing.assert_allclose(served["filtered"], chunk.filtered.tolist(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(served["smoothed"], chunk.smoothed.tolist(), rtol=0, atol=1e-9)


def test_query_filter_streams_a_file_and_prints_a_line_a_frame(server, tmp_path):
    split = load_dataset("synthetic-hmm", num_sequences=30, seed=9).splits["test"]
    lengths = split.lengths[:2]
    path = tmp_path / "stream.npz"
    np.savez(path, x=split.x[:2, : int(lengths.max())].numpy(), lengths=lengths.numpy())
    command = [sys.executable, "-m", "cluster.cli", "query", "filter", "--url", f"{server['base']}/hmm",
               "--input", str(path), "--chunk", "4", "--lag", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["sequence"], line["frame"]) for line in lines] == [(n, t) for n in range(2) for t in range(int(lengths[n]))]
    frames = split.x[0, : int(lengths[0])].tolist()
    whole = streamed(f"{server['base']}/hmm", frames, len(frames), lag=2)
    first = [line for line in lines if line["sequence"] == 0]
    np.testing.assert_allclose([line["per_step"] for line in first], whole["per_step"], rtol=0, atol=1e-9)
    np.testing.assert_allclose([line["smoothed"] for line in first[2:]], whole["smoothed"], rtol=0, atol=1e-9)
    assert "smoothed" not in first[1]


def test_pvalues_of_frames_like_the_reference_are_uniform_and_drift_is_flagged(server):
    """hmm-ref's reference: 1,000 frames drawn from the model. New draws get p-values
    about uniform and no drift; then a stream of flipped keys is flagged as drifted
    before it fills the window."""
    url = f"{server['base']}/hmm-ref"
    model = load_checkpoint(server["checkpoints"]["hmm-ref"])
    x, _ = model.sample(100, 10, seed=HELD_OUT_SEED)
    status, scored = post(f"{url}/v1/score", {"sequences": x.tolist(), "pvalues": True})
    assert status == 200
    pvalues = np.array(scored["pvalues"]).ravel()
    assert pvalues.shape == (1000,) and np.all((pvalues > 0) & (pvalues <= 1))
    for level in (0.1, 0.25, 0.5, 0.75):  # seeded draws: a fixed outcome, not a chance one
        assert abs(np.mean(pvalues <= level) - level) < 0.06, level
    monitor = get(f"{url}/v1/monitor")[1]
    assert monitor["window"] == 1000 and monitor["reference_frames"] == 1000 and not monitor["drifted"], monitor
    assert monitor["version"] == "hmm-ref"

    flipped = (1 - x[:30]).reshape(-1, x.shape[-1]).tolist()  # 300 frames of one stream
    answer = post(f"{url}/v1/filter", {"frames": flipped, "pvalues": True})[1]
    assert np.median(answer["pvalues"]) < 0.1  # half the flipped frames in the upper 10% tail
    monitor = get(f"{url}/v1/monitor")[1]
    assert monitor["window"] == 1300 < monitor["window_limit"] and monitor["drifted"], monitor
    assert monitor["recent_mean_nll"] > monitor["reference_mean_nll"]


def test_a_model_without_a_reference_says_so_and_its_monitor_reports_none(server):
    url = f"{server['base']}/gaussian-hmm"
    body, _ = request_inputs("gaussian-hmm")
    status, answer = post(f"{url}/v1/score", {**body, "pvalues": True})
    assert status == 422 and "has no reference distribution" in answer["detail"]
    assert post(f"{url}/v1/score", {**body, "pvalues": "yes"})[1]["detail"] == "pvalues: expected true or false, got 'yes'"
    assert "pvalues" not in post(f"{url}/v1/score", body)[1]
    status, monitor = get(f"{url}/v1/monitor")
    assert status == 200 and monitor["reference_frames"] == 0 and monitor["statistic"] is None and not monitor["drifted"]
    assert MIN_FRAMES <= monitor["window_limit"]


def test_requests_errors_latency_and_step_nll_reach_the_prometheus_endpoint(server):
    """Ray exports the replicas' metrics every few seconds: wait for them."""
    url = f"{server['base']}/hmm"
    body, _ = request_inputs("hmm")
    post(f"{url}/v1/score", body)
    post(f"{url}/v1/score", {})
    wanted = ['ray_pyrosweep_requests_total{', 'route="/v1/score"', 'ray_pyrosweep_errors_total{', 'status="422"',
              'ray_pyrosweep_latency_s_bucket{', 'ray_pyrosweep_step_nll_bucket{']
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(server["metrics"], timeout=10).read().decode()
        if all(piece in text for piece in wanted):
            break
        time.sleep(2)
    missing = [piece for piece in wanted if piece not in text]
    assert not missing, missing
