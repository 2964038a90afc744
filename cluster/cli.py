"""The ``pyrosweep`` command line.

Errors a user can act on are printed as one line without a traceback (``--debug`` shows
it) and exit with status 2. The commands that run Ray (``sweep``, ``serve``, ``score``,
``submit``, ``demo``) print their own progress only and send the libraries' logs to a file they name
(``-v`` shows those logs too; see :mod:`cluster.console`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from trainables.engines import ENGINE_ENV, ENGINES

from .console import log_file, print_table, quiet_environment, setup_logging
from .data_arguments import add_data_arguments, data_options
from .home import tracking_uri
from .local_ray import prepare_local_ray

LOGGED_COMMANDS = ("sweep", "serve", "score", "submit", "demo")  # each calls _log_to_file
LOCAL_RAY_COMMANDS = ("sweep", "serve", "score", "demo")  # each starts a Ray of its own without --address


def _from_args(settings_class, args: argparse.Namespace):
    """An instance of the dataclass ``settings_class`` from the command-line arguments of
    the same names (fields with no such argument keep their defaults)."""
    given = vars(args)
    return settings_class(**{f.name: given[f.name] for f in fields(settings_class) if f.name in given})


def cmd_data_list(args: argparse.Namespace) -> None:
    from trainables.data import DATASETS

    print_table([{"name": k, "description": v} for k, v in DATASETS.items()], ["name", "description"])
    print("\nuser files: pass a path ending in .npz ({split}_x, {split}_len), .pkl (JSB pickle),"
          " or .csv / .parquet (a table, one row per frame: see `pyrosweep data prepare --help`)")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from trainables.data import dataset_summary, load_argument
    from trainables.data.pianoroll import NUM_KEYS, pitch_class_shares

    dataset = load_argument(args.name, **data_options(args))
    rows = dataset_summary(dataset)
    columns = ["split", *[c for c in rows[0] if c != "split"]]
    print(f"{dataset.name}: {dataset.data_dim} values per frame")
    print_table(rows, columns)
    if dataset.data_dim == NUM_KEYS:  # piano rolls: which keys the music is in
        shares = pitch_class_shares(dataset.splits["train"].x.numpy())
        print("train pitch classes: " + "  ".join(f"{name} {share:.3f}" for name, share in shares.items()))


def _log_to_file(args: argparse.Namespace) -> None:
    """Send the libraries' logs to this command run's log file, and say where it is
    (after the command's imports: Ray and Serve give their loggers handlers at import)."""
    print(f"logs: {setup_logging(args.command, args.verbose)}", flush=True)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    _log_to_file(args)
    run_demo(args.port)


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep_file import describe_plan, load_sweep_file

    overrides = {k: v for k, v in {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent}.items() if v is not None}
    spec = load_sweep_file(args.config, overrides)
    print(describe_plan(spec))
    if args.dry_run:
        return
    from .sweep import run_sweep

    _log_to_file(args)
    outcome = run_sweep(spec, address=args.address, tracking=args.tracking_uri, storage=args.storage, resume=args.resume)
    print(f"\nsweep {spec.name} finished in {outcome.seconds:.0f} s")
    _print_leaderboard(outcome.leaderboard)
    if outcome.best is None:
        raise RuntimeError(f"no trial of {spec.name} finished with a finite {spec.metric}")
    best = outcome.best
    print(f"\nbest trial {best['trial']}: valid NLL {best['best_valid_nll']:.4f}, "
          f"test NLL {best['test_nll']:.4f} nats per frame (MLflow run {best['run_id']})")
    print(f"browse the runs: pyrosweep runs --experiment {spec.name} --tracking-uri {outcome.tracking_uri}")
    print(f"            or: pyrosweep ui --tracking-uri {outcome.tracking_uri}")


def cmd_submit(args: argparse.Namespace) -> None:
    from .jobs import follow, submit
    from .sweep_file import load_sweep_file

    spec = load_sweep_file(args.config)
    extra = ["--num-samples", str(args.num_samples)] if args.num_samples is not None else []
    _log_to_file(args)
    client, job_id = submit(spec, args.address, args.tracking_uri, args.storage, extra)
    print(f"submitted sweep {spec.name} as Ray Job {job_id} to {args.address}")
    if not args.follow:
        print(f"follow it: ray job logs --address {args.address} --follow {job_id}")
        return
    status = follow(client, job_id)
    print(f"\njob {job_id}: {status.value}")
    if status.value != "SUCCEEDED":
        raise RuntimeError(f"Ray Job {job_id} ended {status.value}")


def cmd_tracking_server(args: argparse.Namespace) -> None:
    from .tracking_server import ServerOptions, run

    run(_from_args(ServerOptions, args))


def _print_leaderboard(rows: list[dict]) -> None:
    """The leaderboard, each trial's difference to the best with its 95% CI in one column."""
    versus = "vs_best [95% CI]"
    shown = [{**row, versus: _versus(row)} for row in rows]
    columns = [c for c in (rows[0] if rows else {"trial": ""}) if c not in ("run_id", "vs_best", "ci_low", "ci_high")]
    if "verdict" in columns:
        columns.insert(columns.index("verdict"), versus)
    print_table(shown, columns)


def _versus(row: dict) -> str:
    if not math.isfinite(row.get("vs_best", math.nan)):
        return ""
    return f"{row['vs_best']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"


def cmd_runs(args: argparse.Namespace) -> None:
    """``pyrosweep runs``: the leaderboard of the experiment's latest sweep, by its
    searched hyperparameters (read from the spec its parent run stores)."""
    from .mlflow_layout import SweepTracker
    from .sweep_file import SweepSpec, searched_keys

    tracker = SweepTracker(tracking_uri(args.tracking_uri), args.experiment, create=False)
    parent = tracker.sweep_run()
    # built without validation: it was validated when the sweep started (its data file need not be here)
    stored = SweepSpec.model_construct(**tracker.sweep_spec(parent.info.run_id))
    print(f"sweep {parent.info.run_name} ({parent.info.status}), parent run {parent.info.run_id}")
    searched = searched_keys(stored)
    rows = tracker.leaderboard(parent.info.run_id, searched)
    if args.by is None:
        _print_leaderboard(rows)
        return
    if args.by not in searched:
        raise ValueError(f"--by {args.by}: this sweep searched {', '.join(searched) or 'nothing'}")
    _print_best_per_value(rows, args.by)


def _print_best_per_value(rows: list[dict], key: str) -> None:
    """The best trial per value of ``key``; for ``hidden_dim`` with the one-standard-error pick."""
    from trainables.selection import best_per_value, recommend

    best = best_per_value(rows, key)
    print_table(best, [key, "best_valid_nll", "valid_nll_se", "test_nll", "num_parameters", "bic", "aic", "trial"])
    if key == "hidden_dim" and (chosen := recommend(best)) is not None:
        print(f"recommended hidden_dim: {chosen['hidden_dim']} (the fewest states within one standard error "
              f"of the best held-out NLL; trial {chosen['trial']})")


def cmd_ui(args: argparse.Namespace) -> None:
    uri = tracking_uri(args.tracking_uri)
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    try:
        subprocess.run(command, check=False)
    except KeyboardInterrupt:
        pass


def cmd_serve(args: argparse.Namespace) -> None:
    from serve.limits import BodyLimits

    from .serving import ServeOptions, metrics_export_port, run_server

    autoscale = None
    if args.autoscale:
        low, _, high = args.autoscale.partition(":")
        if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
            raise ValueError(f"--autoscale: expected MIN:MAX with 0 < MIN <= MAX, got {args.autoscale!r}")
        autoscale = (int(low), int(high))
    options = ServeOptions(
        model=args.model,
        tracking_uri=tracking_uri(args.tracking_uri),
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        autoscale=autoscale,
        num_gpus=args.num_gpus,
        max_batch_size=args.max_batch_size,
        address=args.address,
        proxy_location=args.proxy_location,
        body_limits=BodyLimits.build("serve", {
            "max_bytes": None if args.max_body_mb is None else round(args.max_body_mb * 1e6),
            "timeout_s": args.body_timeout_s,
        }),
        request_timeout_s=args.request_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s,
        follow_alias=args.follow_alias,
        poll_s=args.poll_s,
        shadow=args.shadow,
        shadow_fraction=args.shadow_fraction,
        metrics_port=args.metrics_port,
    )
    _log_to_file(args)

    def ready(user_config: dict) -> None:
        print(f"serving {user_config['source']} on http://{args.host}:{args.port} "
              f"(API docs at /docs); Ctrl-C to stop, `pyrosweep swap --port {args.port}` to move "
              f"to the alias's new version", flush=True)
        if args.follow_alias:
            print(f"following {args.model}: the registry is asked every {args.poll_s:g} s", flush=True)
        if not args.address:
            print(f"Prometheus metrics at http://127.0.0.1:{metrics_export_port()}/metrics", flush=True)
        if args.shadow:
            print(f"mirroring {args.shadow_fraction:.0%} of score requests to {args.shadow} "
                  f"(GET /v1/shadow for the comparison)", flush=True)

    run_server(options, on_ready=ready)
    print("stopped", flush=True)


def cmd_swap(args: argparse.Namespace) -> None:
    from .serving import request_swap

    print(f"asked pyrosweep serve (pid {request_swap(args.port)}) to load the current version")


def cmd_query(args: argparse.Namespace) -> None:
    """POST the body of ``--input`` to ``/v1/METHOD`` and print the answer, checked
    against the method's answer model (``serve.schemas``); ``filter`` streams each
    sequence of the input in chunks of ``--chunk`` frames and prints a JSON line a frame,
    ``forecast`` asks for the ``--horizon`` frames after each sequence."""
    from pydantic import ValidationError

    from serve.schemas import METHODS, STREAM_METHODS, check_answer

    if args.method not in METHODS + STREAM_METHODS:
        raise ValueError(f"unknown method {args.method!r}; expected one of {', '.join(METHODS + STREAM_METHODS)}")
    body = _read_query_input(args.input, data_options(args))
    url = f"{args.url.rstrip('/')}/v1/{args.method}"
    if args.method in STREAM_METHODS:
        from .stream_client import filter_lines, forecasts

        sequences = body.get("sequences") if isinstance(body, dict) else None
        if not sequences:
            raise ValueError(f"{args.input}: {args.method} takes sequences (a JSON body with 'sequences', an npz with lengths, a table)")
        post = partial(_post, timeout=args.timeout)
        lines = filter_lines(post, url, sequences, args.chunk, args.lag) if args.method == "filter" else forecasts(post, url, sequences, args.horizon)
        for line in lines:
            print(json.dumps(line), flush=True)
        return
    answer = _post(url, body, args.timeout)
    try:
        print(json.dumps(check_answer(args.method, answer)))
    except ValidationError as error:
        raise RuntimeError(f"{url} answered something that is not a {args.method} answer: {error}") from None


def _post(url: str, body: Any, timeout: float) -> dict:
    """The JSON answer of POSTing ``body`` to ``url``; an HTTP error's detail, or an
    unreachable server, as a ``RuntimeError``."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{error.code}: {json.load(error).get('detail')}") from None
    except urllib.error.URLError as error:
        raise RuntimeError(f"cannot reach {url}: {error.reason}") from None


def cmd_score(args: argparse.Namespace) -> None:
    from serve.schemas import METHODS

    from .batch_scoring import ScoreOptions, run_scoring

    methods = tuple(args.methods.split(","))
    unknown = [method for method in methods if method not in METHODS or method == "sample"]
    if unknown or len(set(methods)) < len(methods):
        raise ValueError(f"--methods {args.methods}: expected distinct methods among score, decode, posterior")
    for flag, value in {"--actors": args.actors, "--batch-size": args.batch_size}.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")
    _log_to_file(args)
    summary = run_scoring(ScoreOptions(
        model=args.model,
        input=args.input,
        output=args.output,
        tracking_uri=tracking_uri(args.tracking_uri),
        methods=methods,
        address=args.address,
        num_gpus=args.num_gpus,
        actors=args.actors,
        batch_size=args.batch_size,
        table_options=data_options(args),
    ))
    print(f"scored {summary.sequences} sequences with {summary.source} in {summary.seconds:.1f} s "
          f"({summary.per_second:.0f} sequences/s; {summary.startup:.1f} s to the first block, "
          f"{summary.steady_per_second:.0f} sequences/s after; {summary.actors} actor(s)): {summary.output}")


def _json_values(frames) -> list:
    """``frames`` ``(T, D)`` (numpy) as JSON lists, NaN (missing) as null."""
    return [[None if value != value else value for value in frame] for frame in frames.tolist()]


def _read_query_input(path: str, options: dict[str, Any]) -> dict:
    """A request body from a JSON file, or from an npz or a table (every sequence or point
    in it, :func:`trainables.data.inputs.read_inputs` with the data flags' ``options``).
    NaN is null."""
    from trainables.data.inputs import INPUT_SUFFIXES, read_inputs

    if Path(path).suffix.lower() in INPUT_SUFFIXES:
        _, inputs = read_inputs(Path(path), path, **options)
        if isinstance(inputs, list):
            return {"sequences": [_json_values(frames) for frames in inputs]}
        return {"points": _json_values(inputs)}
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def build_parser(tokens: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``pyrosweep`` parser; ``train``'s family flags only when ``tokens`` (the command
    line) asks for ``train``."""
    parser = argparse.ArgumentParser(prog="pyrosweep", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the logs of Ray, Tune, Serve and MLflow as they come (they always go to the log file)")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help=f"force a path of the exact engine in this command, its trials and replicas "
                             f"(${ENGINE_ENV}; default auto: compiled on the CPU, the parallel scan for long "
                             f"sequences on a GPU, else the PyTorch recursions)")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="list and prepare data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_commands.add_parser("list", help="the built-in data sets").set_defaults(run=cmd_data_list)
    prepare = data_commands.add_parser("prepare", help="load (and cache) a data set, print its splits")
    prepare.add_argument("name", help="data set name or file path (.npz, .pkl, .csv, .parquet)")
    add_data_arguments(prepare)
    prepare.set_defaults(run=cmd_data_prepare)

    from .train_command import add_train_arguments, cmd_train

    train = commands.add_parser("train", help="train one model and print its NLL per frame")
    add_train_arguments(train, with_families="train" in tokens)
    train.set_defaults(run=cmd_train)

    sweep = commands.add_parser("sweep", help="run a sweep file on Ray Tune, tracked in MLflow")
    sweep.add_argument("config", help="sweep YAML file (see configs/)")
    sweep.add_argument("--address", default=None,
                       help="an existing Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: a local Ray)")
    sweep.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")
    sweep.add_argument("--storage", default=None, help="Ray Tune storage: a path (shared by every node of a "
                       "cluster) or s3:// / gs:// URI (default: $PYROSWEEP_HOME/ray_results)")
    sweep.add_argument("--num-samples", type=int, default=None)
    sweep.add_argument("--max-concurrent", type=int, default=None)
    sweep.add_argument("--resume", action="store_true", help="finish the sweep's interrupted last run")
    sweep.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    sweep.set_defaults(run=cmd_sweep)

    submitted = commands.add_parser("submit", help="run a sweep file as a Ray Job on a cluster")
    submitted.add_argument("config", help="sweep YAML file")
    submitted.add_argument("--address", required=True, help="the cluster's Ray Jobs API, e.g. http://HEAD:8265")
    submitted.add_argument("--tracking-uri", default=None, help="MLflow tracking server the cluster reaches (http://HOST:5000)")
    submitted.add_argument("--storage", default=None, help="Ray Tune storage every node sees (shared path, s3://, gs://)")
    submitted.add_argument("--num-samples", type=int, default=None)
    submitted.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submitted.set_defaults(run=cmd_submit)

    server = commands.add_parser("tracking-server", help="an MLflow tracking server for a cluster (PostgreSQL, proxied artifacts)")
    server.add_argument("--backend-store-uri", required=True, help="postgresql://USER:PASSWORD@HOST:PORT/DB")
    server.add_argument("--artifacts-destination", required=True, help="a directory or s3:// / gs:// URI for artifacts")
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the cluster")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=2)
    server.add_argument("--allowed-hosts", default=None, help="Host headers clients use beyond localhost and private IPs")
    server.set_defaults(run=cmd_tracking_server)

    runs = commands.add_parser("runs", help="leaderboard of the latest sweep of an experiment")
    runs.add_argument("--experiment", required=True, help="the sweep name")
    runs.add_argument("--tracking-uri", default=None)
    runs.add_argument("--by", default=None, metavar="KEY",
                      help="the best trial per value of a searched key (hidden_dim: with held-out NLL, "
                           "BIC, AIC and the recommended number of states)")
    runs.set_defaults(run=cmd_runs)

    ui = commands.add_parser("ui", help="the MLflow UI on the same store, on 127.0.0.1")
    ui.add_argument("--tracking-uri", default=None)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(run=cmd_ui)

    from .promote import add_promote_arguments, cmd_promote

    promote = commands.add_parser("promote", help="register a sweep's best trial in the MLflow registry, move the alias")
    add_promote_arguments(promote)
    promote.set_defaults(run=cmd_promote)

    served = commands.add_parser("serve", help="serve a registered model (or a checkpoint) over HTTP with Ray Serve")
    served.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory")
    served.add_argument("--tracking-uri", default=None)
    served.add_argument("--host", default="127.0.0.1")
    served.add_argument("--port", type=int, default=8000)
    served.add_argument("--replicas", type=int, default=1)
    served.add_argument("--autoscale", default=None, help="MIN:MAX replicas")
    served.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (may be fractional)")
    served.add_argument("--max-batch-size", type=int, default=16)
    served.add_argument("--address", default=None, help="an existing Ray cluster: auto, HOST:PORT or ray://HOST:10001")
    served.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly"],
                        help="where Ray Serve runs its HTTP proxies")
    from serve.limits import BodyLimits

    served.add_argument("--max-body-mb", type=float, default=None,
                        help="largest request body in MB (413 beyond it; default: sized from the frame limit and the model)")
    served.add_argument("--body-timeout-s", type=float, default=BodyLimits().timeout_s,
                        help="seconds a client has to send its whole body (408 after)")
    served.add_argument("--request-timeout-s", type=float, default=None,
                        help="Serve's end-to-end limit on one request, answer included (408; default: none)")
    served.add_argument("--keep-alive-timeout-s", type=int, default=None,
                        help="how long an idle connection stays open (default: Serve's, 90 s)")
    served.add_argument("--metrics-port", type=int, default=None,
                        help="where a local Ray serves the Prometheus metrics of the replicas (default: a free port, printed)")
    served.add_argument("--follow-alias", action="store_true",
                        help="watch the registry and swap whenever the --model alias (models:/NAME@ALIAS) moves")
    served.add_argument("--poll-s", type=float, default=10.0, help="seconds between registry polls of --follow-alias")
    served.add_argument("--shadow", default=None, metavar="URI",
                        help="a challenger (models:/NAME@challenger, ...) that score requests are mirrored to; "
                        "GET /v1/shadow compares it with the served model")
    served.add_argument("--shadow-fraction", type=float, default=1.0, metavar="F",
                        help="share of score requests mirrored to --shadow (0 < F <= 1)")
    served.set_defaults(run=cmd_serve)

    swapped = commands.add_parser("swap", help="move a running `pyrosweep serve` to its alias's current version")
    swapped.add_argument("--port", type=int, default=8000)
    swapped.set_defaults(run=cmd_swap)

    query = commands.add_parser("query", help="send a request to a served model and print the answer")
    from serve.schemas import METHODS, STREAM_METHODS

    query.add_argument("method", choices=METHODS + STREAM_METHODS)
    query.add_argument("--url", default="http://127.0.0.1:8000")
    query.add_argument("--input", required=True, help="JSON body, .npz with x (N, T, D) and lengths (N,) "
                       "(points: x (N, D) alone), or a table (.csv, .parquet: every sequence in it)")
    query.add_argument("--timeout", type=float, default=60.0)
    query.add_argument("--chunk", type=int, default=1, help="filter: frames per request (a stream's chunks)")
    query.add_argument("--lag", type=int, default=None, help="filter: fixed-lag smoothing, p(z[t-lag] | x[<=t])")
    query.add_argument("--horizon", type=int, default=1, help="forecast: frames ahead of each sequence")
    add_data_arguments(query, built_in=False, splits=False)
    query.set_defaults(run=cmd_query)

    scored = commands.add_parser(
        "score", help="score files of sequences with Ray Data into one Parquet file (batch scoring)",
        description="Score every sequence of --input with the model, on Ray Data actors that load it once, "
        "and write one Parquet file: a row per sequence, in the input's order, with the columns file "
        "(directory inputs only: the file's name), sequence (a table's sequence id; an npz's index), "
        "observed_values, and the served answers' fields of each method: score: log_likelihood, per_step; "
        "decode: states, log_joint; posterior: marginals (the DMM: latents, loc, scale). The answers are "
        "those of pyrosweep serve (within float32 rounding). The input is checked on this machine before "
        "Ray starts. Models of points are refused (pyrosweep query scores points).",
    )
    scored.add_argument("--model", required=True, help="models:/NAME@ALIAS (pinned to its version at the start), "
                        "models:/NAME/VERSION or a checkpoint directory")
    scored.add_argument("--input", required=True, help=".npz with x (N, T, D) and lengths (N,), a table (.csv, "
                        ".parquet, .pq: one row per frame), or a directory of such files")
    scored.add_argument("--output", required=True, help="the Parquet file to write (replaced if it exists)")
    scored.add_argument("--methods", default="score", help="comma-separated: score, decode, posterior (default: score)")
    scored.add_argument("--tracking-uri", default=None)
    scored.add_argument("--address", default=None, help="an existing Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                        "(default: a local Ray)")
    scored.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (may be fractional)")
    scored.add_argument("--actors", type=int, default=None,
                        help="scoring actors, 1 CPU each (default: one per CPU of the cluster, as GPUs allow)")
    scored.add_argument("--batch-size", type=int, default=256, help="sequences computed as one batch (default: 256)")
    add_data_arguments(scored, built_in=False, splits=False)
    scored.set_defaults(run=cmd_score)

    demo = commands.add_parser("demo", help="the whole loop on embedded defaults: sweep, promote, serve, query")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    tokens = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(tokens).parse_args(tokens)
    # no tqdm bars for every small artifact download (inherited by local Ray workers)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.engine:  # read by every process of this command: local Ray workers inherit it, clusters get it in the runtime env
        os.environ[ENGINE_ENV] = args.engine
    if args.command in LOGGED_COMMANDS:
        quiet_environment()  # before the command imports Ray or MLflow
    if args.command in LOCAL_RAY_COMMANDS and not (getattr(args, "address", None) or getattr(args, "dry_run", False)):
        prepare_local_ray()  # loopback only, before the command imports Ray
    try:
        args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as error:
        if args.debug:
            _point_to_log()
            raise
        print(f"pyrosweep: error: {error}", file=sys.stderr)
        _point_to_log()
        return 2
    except BaseException:  # a traceback: a bug, or Ctrl-C
        _point_to_log()
        raise
    return 0


def _point_to_log() -> None:
    """After a failure: where this command run's log file is, if it has one."""
    if log_file() is not None:
        print(f"pyrosweep: the libraries' logs of this run: {log_file()} (-v shows them as they come, "
              f"with Ray's workers' output)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
