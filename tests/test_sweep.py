"""Sweeps end to end: a real local Ray, a real MLflow store, real training, faults on purpose.

One Ray head serves the whole module (with one logical GPU for the accounting test);
the CLI tests run ``pyrosweep sweep`` as a separate driver process against it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from pyarrow import fs
from ray import tune

from cluster.sweep import run_sweep
from cluster.sweep_file import load_sweep_file, num_trials
from cluster.mlflow_layout import PARENT_TAG, SEED_TAG, TRIAL_TAG, SweepTracker
from cluster.promote import promote
from cluster.serving import ServeOptions, serving
from helpers import free_port, get, mlflow_runs, post, write_sweep
from test_exact import enumerate_paths
from test_speed_paths import assert_same_run, restart_setting
from trainables.data import load_dataset
from trainables.models import build_model
from trainables.svi import Candidate, Trainer, screen_initializations
from trainables.alignment import decoded_states, restart_agreement
from trainables.checkpoint import TRIAL_STATE
from trainables.held_out import HELD_OUT, HELD_OUT_ARTIFACT, HeldOutScores
from trainables.trainable import TrialSetup, run_trial

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}

@pytest.fixture(scope="module")
def ray_address():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in S3_TEST_ENV.items():  # for `s3_storage`, inherited by the Ray workers
            patch.setenv(key, value)
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()


def test_a_tiny_sweep_logs_one_parent_and_a_finished_child_per_trial(tmp_path, ray_address):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_sweep_file(write_sweep(tmp_path, "tiny"))
    outcome = run_sweep(spec, tracking=uri, storage=str(tmp_path / "ray"))
    client, parents, children = mlflow_runs(uri, "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        assert child.data.tags[PARENT_TAG] == parents[0].info.run_id
        assert child.data.tags["ray.node_id"] and child.data.tags["hostname"]
        assert child.data.tags["engine"] == "compiled", "the engine's path a CPU trial took"
        assert {"hidden_dim", "lr", "seed", "model", "epochs"} <= set(child.data.params)
        assert child.data.params["prior_sticky"] == "0.9", "declared defaults are logged too"
        history = client.get_metric_history(child.info.run_id, "valid_nll")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert "test_nll" in child.data.metrics and "screen_best" in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"loss_curve.png", "model.png", "checkpoint", "trial_config.json"} <= artifacts
        checkpoint = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
        assert {"checkpoint/model.pt", "checkpoint/config.json", f"checkpoint/{HELD_OUT}"} <= checkpoint
        held_out = HeldOutScores.read(client.download_artifacts(child.info.run_id, HELD_OUT_ARTIFACT, str(tmp_path)))
        # the trial's figures summed batch by batch in float32 (64 sequences): within 64 float32 roundings
        assert held_out.exact and held_out.per_frame("valid") == pytest.approx(child.data.metrics["best_valid_nll"], rel=64 * 2**-23)
        assert held_out.per_frame("test") == pytest.approx(child.data.metrics["test_nll"], rel=1e-12)
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"leaderboard.csv", "search.png", "sweep"} <= parent_artifacts
    leaderboard = Path(client.download_artifacts(parents[0].info.run_id, "leaderboard.csv", str(tmp_path)))
    rows = list(csv.DictReader(leaderboard.open()))
    by_run = {c.info.run_id: c for c in children}
    assert {row["run_id"] for row in rows} == set(by_run)
    for row in rows:
        assert float(row["best_valid_nll"]) == pytest.approx(by_run[row["run_id"]].data.metrics["best_valid_nll"])
        assert row["exact"] == "True"
    assert rows[0]["verdict"] == "best" and rows[1]["verdict"] in {"tied", "worse"}
    assert float(rows[1]["ci_low"]) <= float(rows[1]["vs_best"]) <= float(rows[1]["ci_high"])
    assert outcome.best["run_id"] == rows[0]["run_id"]
    assert parents[0].data.tags["best_run_id"] == rows[0]["run_id"]


def test_faults_end_as_failed_or_are_retried_and_nothing_is_left_running(tmp_path, ray_address):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_sweep_file(write_sweep(tmp_path, "faults", epochs=5, hidden_dim="2"))
    faults = [None, {"kind": "raise", "epoch": 2}, {"kind": "nan", "epoch": 3}, {"kind": "kill", "epoch": 3}]
    outcome = run_sweep(spec, tracking=uri, storage=str(tmp_path / "ray"), extra_space={"_fault": tune.grid_search(faults)})
    client, parents, children = mlflow_runs(uri, "faults")
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4 and len({c.data.tags[TRIAL_TAG] for c in children}) == 4
    by_fault = {c.data.params["_fault"]: c for c in children}
    assert by_fault["None"].info.status == "FINISHED"
    raised = by_fault[str(faults[1])]
    assert raised.info.status == "FAILED" and "injected fault at epoch 2" in raised.data.tags["error"]
    diverged = by_fault[str(faults[2])]
    assert diverged.info.status == "FAILED" and "non-finite training loss" in diverged.data.tags["error"]
    killed = by_fault[str(faults[3])]
    assert killed.info.status == "FINISHED", "a killed worker is retried from its checkpoint"
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "valid_nll")]
    assert steps == [1, 2, 3, 4, 5]
    assert outcome.best["status"] == "FINISHED"
    assert outcome.best["run_id"] in {by_fault["None"].info.run_id, killed.info.run_id}


def test_a_fractional_gpu_request_is_accounted_and_missing_cuda_is_a_clear_failure(tmp_path, ray_address):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_sweep_file(write_sweep(tmp_path, "gpu", epochs=2, gpu=0.5))
    run_sweep(spec, tracking=uri, storage=str(tmp_path / "ray"))
    _, parents, children = mlflow_runs(uri, "gpu")
    assert len(children) == 2
    for child in children:
        assert child.data.params["resources_gpu"] == "0.5"
        assert child.info.status == "FAILED"
        assert "given 0.5 GPU by Ray but CUDA is not available" in child.data.tags["error"]
    assert parents[0].info.status == "FINISHED"


def pyrosweep(*args: str, tmp_path: Path, log: str, extra_env: dict | None = None) -> subprocess.Popen:
    """``pyrosweep ARGS`` as its own process group, output into ``tmp_path / log``."""
    env = {**os.environ, "PYROSWEEP_HOME": str(tmp_path / "home"), **(extra_env or {})}
    with (tmp_path / log).open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *args], env=env, text=True,
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )


def finish(process: subprocess.Popen, tmp_path: Path, log: str, timeout: float = 600) -> str:
    process.wait(timeout=timeout)
    return (tmp_path / log).read_text()


@pytest.fixture(scope="module")
def s3_storage():
    """An S3 bucket behind a real S3 API on loopback (moto's server); yields the storage
    URI with its endpoint in the query (credentials: ``S3_TEST_ENV``)."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    deadline = time.monotonic() + 30
    while True:
        try:
            bucket = fs.S3FileSystem(**dict(pair.split("=") for pair in options.split("&")), allow_bucket_creation=True)
            bucket.create_dir("sweeps")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    yield f"s3://sweeps/ray_results?{options}"
    server.terminate()
    server.wait(timeout=30)


def trials_checkpointed(uri: str) -> bool:
    """Whether two trials have started and every trial that has logged an epoch has logged
    three: the result of epoch 2 carried a checkpoint (``checkpoint_every: 2``), and the
    driver takes in a trial's results, checkpoints included, in order before logging the next."""
    try:
        client, _, children = mlflow_runs(uri, "resume")
        logged = [len(client.get_metric_history(child.info.run_id, "valid_nll")) for child in children]
    except Exception:  # noqa: BLE001 - the store or the experiment may not exist yet
        return False
    started = [epochs for epochs in logged if epochs]
    return len(started) >= 2 and min(started) >= 3


def wait_until_two_trials_checkpointed(uri: str, driver: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not trials_checkpointed(uri):
        assert driver.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no two trials logged 3 epochs in {timeout} s\n{log.read_text()}"
        time.sleep(0.2)


def experiment_state(storage: Path, name: str) -> tuple[int, str] | None:
    """The mtime (ns) of the searcher state and the text of the experiment state of sweep
    ``name``'s Tune run under a local ``storage``, in that order; None before a first save."""
    try:
        run_dir = storage / json.loads((storage / f"{name}.sweep.json").read_text())["run_name"]
        searcher = sorted(run_dir.glob("basic-variant-state-*.json"))[-1].stat().st_mtime_ns
        return searcher, sorted(run_dir.glob("experiment_state-*.json"))[-1].read_text()
    except (OSError, ValueError, IndexError, KeyError):
        return None


def wait_for_an_experiment_state_save(driver: subprocess.Popen, storage: Path, name: str, since, timeout: float = 60) -> None:
    """Until Tune has finished a save of its state that began after ``since`` (what
    ``experiment_state`` read then) was read.

    A save writes the experiment state file in place, then replaces the searcher's: a
    searcher file changed since the last look, next to an experiment state that parses and
    differs from ``since``'s, is a save just done. The driver logs results and saves in one
    thread, so that save has every trial as logged before ``since``. Returning right after
    a save also keeps a kill away from the next one (about a second on)."""
    deadline, last = time.monotonic() + timeout, since
    while True:
        assert driver.poll() is None, "the driver ended before it was stopped"
        assert time.monotonic() < deadline, f"Tune saved no experiment state under {storage} in {timeout} s"
        now = experiment_state(storage, name)
        if now is not None and last is not None and now[0] != last[0] and now[1] != (since or (0, ""))[1]:
            try:
                json.loads(now[1])
                return
            except ValueError:  # being written again already
                pass
        last = now or last
        time.sleep(0.02)


@pytest.mark.parametrize(
    "stop, storage", [(signal.SIGKILL, "local"), (signal.SIGINT, "s3")], ids=["killed-local", "interrupted-s3"]
)
def test_driver_stopped_then_resume_finishes_the_same_sweep(tmp_path, ray_address, stop, storage, request):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The driver is stopped once the running trials have checkpointed, 3 epochs in; a kill
    # waits for Tune to save its state too (~1 s: ~10 epochs on an idle machine). A trial
    # that ends first only makes the wait include the next one.
    epochs = 30 if stop == signal.SIGKILL else 12
    config = write_sweep(tmp_path, "resume", epochs=epochs, num_samples=2, sequences=300)
    where = request.getfixturevalue("s3_storage") if storage == "s3" else str(tmp_path / "ray")
    common = ["--address", ray_address, "--tracking-uri", uri, "--storage", where]
    driver = pyrosweep(
        "sweep", str(config), *common, tmp_path=tmp_path, log="first.log", extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "1"}
    )
    wait_until_two_trials_checkpointed(uri, driver, tmp_path / "first.log")
    if stop == signal.SIGKILL:
        # a kill keeps only what Tune saved: wait for a save made since, and wait again if a
        # trial started meanwhile (killed before its first checkpoint, it would rerun from scratch)
        while True:
            wait_for_an_experiment_state_save(driver, tmp_path / "ray", "resume", experiment_state(tmp_path / "ray", "resume"))
            if trials_checkpointed(uri):
                break
            wait_until_two_trials_checkpointed(uri, driver, tmp_path / "first.log")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    else:  # Ctrl-C: the driver stops the trials, saves the state and says how to resume
        driver.send_signal(signal.SIGINT)
        output = finish(driver, tmp_path, "first.log", timeout=120)
        assert driver.returncode == 2 and "--resume" in output, output
    _, parents_before, children_before = mlflow_runs(uri, "resume")
    if stop == signal.SIGINT:
        assert "RUNNING" not in {run.info.status for run in [*parents_before, *children_before]}
    resumed = pyrosweep("sweep", str(config), *common, "--resume", tmp_path=tmp_path, log="resumed.log")
    output = finish(resumed, tmp_path, "resumed.log")
    assert resumed.returncode == 0, output
    assert "best trial" in output
    client, parents, children = mlflow_runs(uri, "resume")
    assert [p.info.run_id for p in parents] == [p.info.run_id for p in parents_before]
    assert parents[0].info.status == "FINISHED"
    trial_ids = [c.data.tags[TRIAL_TAG] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 4
    assert {c.info.run_id for c in children_before} <= {c.info.run_id for c in children}
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "valid_nll")]
        assert steps.count(1) == 1, "no trial trained twice from scratch"
        assert sorted(set(steps)) == list(range(1, max(steps) + 1)), "no epoch skipped"
        assert "checkpoint" in {artifact.path for artifact in client.list_artifacts(child.info.run_id)}

    runs = pyrosweep("runs", "--experiment", "resume", "--tracking-uri", uri, tmp_path=tmp_path, log="runs.log")
    table = finish(runs, tmp_path, "runs.log")
    assert runs.returncode == 0, table
    for child in children:
        assert child.data.tags[TRIAL_TAG] in table
    assert "vs_best [95% CI]" in table and re.search(r"\+0\.0000 \[\+0\.0000, \+0\.0000\]\s+best", table)


def test_a_trial_trains_its_kept_candidates_as_one_batched_model(tmp_path, ray_address):
    """A real Tune trial with ``restarts: {screen: 12, keep: 4}``: every candidate's run,
    read back from the trial's checkpoint, equals its start trained alone."""
    data, config, _ = restart_setting()
    settings = {"epochs": config.epochs, "batch_size": config.batch_size, "patience": config.patience}
    setup = TrialSetup("hmm", data, settings, screen=12, keep=4, checkpoint_every=100)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 1}),
        param_space={"hidden_dim": 3, "lr": config.lr, "seed": config.seed},
        run_config=tune.RunConfig(name="restarts", storage_path=str(tmp_path), verbose=0),
    )
    result = tuner.fit()[0]
    with result.checkpoint.as_directory() as directory:
        (state,) = torch.load(Path(directory) / TRIAL_STATE, weights_only=True)  # one batched trainer
    candidates = [Candidate.from_state_dict(candidate) for candidate in state["candidates"]]
    _, starts = screen_initializations(
        build_model("hmm", data_dim=data.data_dim, hidden_dim=3), data.splits["train"], 12,
        torch.Generator().manual_seed(config.seed), keep=4,
    )  # fmt: skip
    alone = []
    for start in starts:
        trainer = Trainer(build_model("hmm", data_dim=data.data_dim, hidden_dim=3), data, config, start)
        while not trainer.done:
            trainer.run_epoch()
        alone.append(trainer)
    assert len(candidates) == 4
    for candidate, trainer in zip(candidates, alone):
        assert_same_run(candidate, trainer)
    chosen = min(range(4), key=lambda i: alone[i].history[-1].train_loss)
    assert result.metrics["candidate"] == chosen and result.metrics["setup_s"] > 0
    assert result.metrics["best_valid_nll"] == pytest.approx(alone[chosen].best_valid, rel=1e-5)
    for trainer in alone:
        trainer.result()  # the model at its best epoch
    order = [chosen, *(i for i in range(4) if i != chosen)]
    paths = [decoded_states(alone[i].model, data.splits["valid"]) for i in order]
    assert result.metrics["restart_ari"] == pytest.approx(restart_agreement(paths), abs=1e-6)


SEEDS_SWEEP = """
name: seeds
model: hmm
data: {name: synthetic-hmm, num_sequences: 30, length: 12, hidden_dim: 2}
train: {epochs: 4, batch_size: 10, patience: 50, lr: 0.05, seed: 10}
search:
  hidden_dim: {grid: [2, 3]}
restarts: {screen: 2, keep: 1}
seeds: 3
max_concurrent: 2
"""


def test_seeds_repeat_each_configuration_and_the_trial_reports_their_mean(tmp_path, ray_address):
    """``seeds: 3``: each trial trains three members seeded 10, 11, 12; its run has their
    means (what Tune saw) and the best member's checkpoint; each member has a nested run."""
    path = tmp_path / "seeds.yaml"
    path.write_text(SEEDS_SWEEP)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    outcome = run_sweep(load_sweep_file(path), tracking=uri, storage=str(tmp_path / "ray"))
    client, parents, children = mlflow_runs(uri, "seeds")
    seed_runs = SweepTracker(uri, "seeds").seed_runs(parents[0].info.run_id)
    assert len(children) == 2 and len(seed_runs) == 6
    assert {run.info.status for run in [*children, *seed_runs]} == {"FINISHED"}
    for child in children:
        members = sorted((r for r in seed_runs if r.data.tags[PARENT_TAG] == child.info.run_id), key=lambda r: r.data.tags[SEED_TAG])
        assert [json.loads(r.data.tags["pyrosweep.config"])["seed"] for r in members] == [10, 11, 12]
        best = [r.data.metrics["best_valid_nll"] for r in members]
        assert child.data.metrics["best_valid_nll"] == pytest.approx(np.mean(best), rel=1e-12)
        assert child.data.metrics["seed_se"] == pytest.approx(np.std(best, ddof=1) / np.sqrt(3), rel=1e-9)
        mean_curve = np.mean([[m.value for m in sorted(client.get_metric_history(r.info.run_id, "valid_nll"), key=lambda m: m.step)] for r in members], axis=0)
        curve = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "valid_nll"), key=lambda m: m.step)]
        np.testing.assert_allclose(curve, mean_curve, rtol=1e-12)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
        assert not any("seed_" in a for a in artifacts), "each member's checkpoint is in its own run"
        saved = json.loads(Path(client.download_artifacts(child.info.run_id, "checkpoint/config.json", str(tmp_path))).read_text())
        assert saved["valid_nll"] == pytest.approx(min(best)), "the trial's model is its best member's"
        for member in members:
            assert {"checkpoint/model.pt", f"checkpoint/{HELD_OUT}"} <= {a.path for a in client.list_artifacts(member.info.run_id, "checkpoint")}
    assert all(row["seeds"] == 3 and row["seed_se"] > 0 for row in outcome.leaderboard)
    assert outcome.leaderboard[0]["verdict"] == "best"


METHODS_SWEEP = """
name: methods
model: gaussian-hmm
data: {name: synthetic-gaussian-hmm, num_sequences: 30, length: 20}
train: {epochs: 6, batch_size: 10, patience: 50, lr: 0.05}
search:
  hidden_dim: 2
  method: {grid: [svi, em]}
restarts: {screen: 4, keep: 2}
max_concurrent: 2
"""


def test_a_sweep_searches_the_training_method(tmp_path, ray_address):
    """``method: {grid: [svi, em]}``: both trials finish and log their method; the EM
    trial's kept restarts run as one batched model and its iterations are its epochs."""
    path = tmp_path / "methods.yaml"
    path.write_text(METHODS_SWEEP)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_sweep(load_sweep_file(path), tracking=uri, storage=str(tmp_path / "ray"))
    client, _, children = mlflow_runs(uri, "methods")
    by_method = {child.data.params["method"]: child for child in children}
    assert set(by_method) == {"svi", "em"} and {c.info.status for c in children} == {"FINISHED"}
    em_history = client.get_metric_history(by_method["em"].info.run_id, "train_loss")
    losses = [m.value for m in sorted(em_history, key=lambda m: m.step)]
    assert 2 <= len(losses) <= 6 and all(np.isfinite(losses))  # (monotone per candidate: tests/test_em.py)
    assert all(-1 <= child.data.metrics["restart_ari"] <= 1 for child in children), "two restarts kept: their agreement"


NEW_FAMILY_SWEEP = """
name: {family}-served
model: {family}
data: {{name: synthetic-{family}, num_sequences: 30, length: 12, hidden_dim: 2}}
train: {{epochs: 5, batch_size: 10, lr: 0.05, patience: 50}}
search:
  hidden_dim: 2
  method: {{grid: [svi, em]}}
restarts: {{screen: 3, keep: 1}}
max_concurrent: 2
"""


@pytest.mark.parametrize("family", ["categorical-hmm", "poisson-hmm"])
def test_a_new_family_swept_by_both_methods_is_promoted_and_served(tmp_path, ray_address, family):
    """Symbols and counts the whole way: an SVI and an EM trial, the winner promoted and
    served over HTTP, its answers checked against enumerating every path of the served
    parameters, and a symbol or count out of its range refused with a 4xx that says where."""
    path = tmp_path / "family.yaml"
    path.write_text(NEW_FAMILY_SWEEP.format(family=family))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    outcome = run_sweep(load_sweep_file(path), tracking=uri, storage=str(tmp_path / "ray"))
    _, _, children = mlflow_runs(uri, f"{family}-served")
    assert {c.data.params["method"] for c in children} == {"svi", "em"}
    assert {c.info.status for c in children} == {"FINISHED"}
    promoted = promote(uri, f"{family}-served")
    assert promoted["run_id"] == outcome.best["run_id"]

    frames = load_dataset(f"synthetic-{family}", num_sequences=30, length=12, hidden_dim=2).splits["test"].x[0, :5]
    port = free_port()
    with serving(ServeOptions(model=f"models:/{family}-served@champion", tracking_uri=uri, port=port)):
        url = f"http://127.0.0.1:{port}"
        status, described = get(f"{url}/v1/model")
        assert status == 200 and described["family"] == family and described["version"] == promoted["version"]
        body = {"sequences": [frames.tolist()]}
        (status, scored), (decoded_status, decoded) = post(f"{url}/v1/score", body), post(f"{url}/v1/decode", body)
        assert status == decoded_status == 200
        wrong = frames.clone()
        wrong[3] = 2 * frames[3] if family == "categorical-hmm" else -1
        status, refused = post(f"{url}/v1/score", {"sequences": [wrong.tolist()]})
        assert status == 422 and "sequences[0][3]" in refused["detail"], refused
        assert get(f"{url}/healthz")[0] == 200
    model = build_model(family, data_dim=frames.shape[-1], hidden_dim=2).double()
    model.set_parameters(**{name: torch.tensor(value, dtype=torch.float64) for name, value in described["parameters"].items()})
    paths = enumerate_paths(family, model, frames.double())  # 2^5 paths
    log_likelihood = float(torch.stack([joint for joint, _ in paths]).logsumexp(0))
    best = max(paths, key=lambda pair: float(pair[0]))[1]
    # served in float32: about T (V + 2K) = 50 roundings of 2**-24 on the way to the
    # total (3e-6 relative); 1e-4 leaves room, the paths are enumerated in float64
    assert scored["log_likelihood"][0] == pytest.approx(log_likelihood, rel=1e-4)
    assert decoded["states"][0] == best


def test_a_sweep_over_the_number_of_states_recommends_the_true_one(tmp_path, ray_address):
    """``configs/gaussian-hmm-states.yaml``: three well-separated true states (4-D Gaussian); every trial logs its free parameters,
    BIC, AIC and held-out standard error; the parent gets the K curve, the table and the
    one-standard-error pick, 3; ``pyrosweep runs --by hidden_dim`` prints the same."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_sweep(load_sweep_file(CONFIGS / "gaussian-hmm-states.yaml"), tracking=uri, storage=str(tmp_path / "ray"))
    client, parents, children = mlflow_runs(uri, "gaussian-hmm-states")
    by_k = {int(child.data.params["hidden_dim"]): child.data.metrics for child in children}
    assert sorted(by_k) == [1, 2, 3, 4, 5]
    assert [by_k[k]["num_parameters"] for k in sorted(by_k)] == [8, 19, 32, 47, 64]  # K-1 + K(K-1) + 2 K D
    assert all(metrics["valid_nll_se"] > 0 and metrics["bic"] > metrics["aic"] for metrics in by_k.values())
    assert min(by_k, key=lambda k: by_k[k]["bic"]) == 3
    parent = parents[0]
    assert parent.data.tags["recommended_hidden_dim"] == "3"
    assert {"k_curve.png", "k_selection.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    table = Path(client.download_artifacts(parent.info.run_id, "k_selection.csv", str(tmp_path)))
    assert [int(row["hidden_dim"]) for row in csv.DictReader(table.open())] == [1, 2, 3, 4, 5]
    runs = pyrosweep("runs", "--experiment", "gaussian-hmm-states", "--tracking-uri", uri, "--by", "hidden_dim", tmp_path=tmp_path, log="runs.log")
    output = finish(runs, tmp_path, "runs.log", timeout=120)
    assert runs.returncode == 0, output
    assert "recommended hidden_dim: 3" in output and "bic" in output.splitlines()[1]
    wrong = pyrosweep("runs", "--experiment", "gaussian-hmm-states", "--tracking-uri", uri, "--by", "lr", tmp_path=tmp_path, log="wrong.log")
    output = finish(wrong, tmp_path, "wrong.log", timeout=120)
    assert wrong.returncode != 0 and "--by lr: this sweep searched hidden_dim" in output


def test_a_bad_sweep_file_is_refused_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(write_sweep(tmp_path, "bad").read_text().replace("patience: 50", "patiense: 50"))
    started = time.perf_counter()
    process = pyrosweep("sweep", str(bad), tmp_path=tmp_path, log="bad.log")
    output = finish(process, tmp_path, "bad.log", timeout=120)
    assert process.returncode == 2
    assert "train.patiense" in output and "Traceback" not in output
    assert "Ray" not in output
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("config, samples", [("gmm-synthetic.yaml", 2), ("gaussian-hmm-synthetic.yaml", 2), ("categorical-hmm-synthetic.yaml", 1)])
def test_example_configs_run_with_their_scheduler_and_search(tmp_path, ray_address, config, samples):
    spec = load_sweep_file(CONFIGS / config, {"num_samples": samples})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    outcome = run_sweep(spec, tracking=uri, storage=str(tmp_path / "ray"))
    _, parents, children = mlflow_runs(uri, spec.name)
    assert len(children) == num_trials(spec) and {c.info.status for c in children} == {"FINISHED"}
    assert outcome.best is not None and parents[0].info.status == "FINISHED"


def test_ui_serves_the_same_store_on_loopback(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # one uvicorn worker and no job runner: MLflow's default of 4 workers plus a job runner,
    # each importing its server app, took ~55 s to come up on 2 busy cores
    quick = {"MLFLOW_WORKERS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    ui = pyrosweep("ui", "--tracking-uri", uri, "--port", str(port), tmp_path=tmp_path, log="ui.log", extra_env=quick)
    try:
        deadline, answer = time.time() + 120, None
        while time.time() < deadline and answer is None:
            time.sleep(0.2)
            try:
                answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            except OSError:
                continue
        assert answer is not None, (tmp_path / "ui.log").read_text()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
