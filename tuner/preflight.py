"""What the project's commands share before any trial: the one-line usage error, the data, the
MLflow URI and Ray address checks, Ray's start and the Optuna storage.

``tuner.search``, ``tuner.report`` and ``tuner.table`` import these from here (``tuner.search``
re-exports them under their old names).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import urllib.request
import warnings
from pathlib import Path

from trainables.data import MultimodalData, load_dataset
from tuner.redact import redact_uris

__all__ = ["CONNECT_TIMEOUT_S", "OneLineParser", "UsageError", "check_address",
           "check_tracking_uri", "exit_cli", "init_ray", "load_data", "ray_address",
           "resolve_data", "study_storage_for"]


class UsageError(ValueError):
    """A command-line value that cannot be used."""


#: seconds to wait for an MLflow server or a Ray head before calling it unreachable
CONNECT_TIMEOUT_S = 5.0


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit code 2), like every other."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def resolve_data(spec: str, nonfinite: str = "error", unlabeled: str | None = None) -> MultimodalData:
    """Load (and validate) the data a space names, with ``unlabeled`` (a path) as its unlabeled
    split if given; synthetic sets are generated on first use into ./data/ as Parquet, and
    re-generated when a copy made before unlabeled pools existed lacks ``unlabeled.parquet``."""
    if spec.startswith("synthetic:"):
        size = spec.split(":", 1)[1] or "mosi"
        path = Path("data") / f"synthetic-{size}"
        if not (path / "train.parquet").exists() or not (path / "unlabeled.parquet").exists():
            import transformers

            from trainables.data.synthetic import write_synthetic
            from trainables.text import load_text_model, load_tokenizer

            transformers.utils.logging.disable_progress_bar()

            print(f"Generating the synthetic {size} data set into {path}/ (once) ...", flush=True)
            write_synthetic(path, size=size, seed=0, tokenizer=load_tokenizer(),
                            text_encoder=load_text_model())
        return load_dataset(path, nonfinite=nonfinite, unlabeled=unlabeled)
    return load_dataset(Path(spec).expanduser(), nonfinite=nonfinite, unlabeled=unlabeled)


def _load_data(spec: str, nonfinite: str, unlabeled: str | None = None) -> MultimodalData:
    """:func:`resolve_data`, with the pickle warning as one ``warning:`` line on stderr."""
    with warning_lines():
        return resolve_data(spec, nonfinite, unlabeled)


@contextlib.contextmanager
def warning_lines():
    """Within it, each UserWarning is one ``warning:`` line on stderr, printed at once: the
    pickle warning appears before ``pickle.load`` runs, not after it."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():  # restores showwarning and the filters
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


def check_tracking_uri(uri: str | None) -> None:
    """An MLflow server must answer (any HTTP status) within CONNECT_TIMEOUT_S; a SQLite store
    needs an existing folder. MLflow's own client would retry for minutes instead."""
    import urllib.error
    import urllib.request

    if not uri:
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(_health_request(uri), timeout=CONNECT_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            return  # it answered (a proxy's 401/404 included): reachable
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = redact_uris(getattr(exc, "reason", exc))
            raise UsageError(
                f"--mlflow-uri {redact_uris(uri)}: no MLflow server answers there ({reason}); start one "
                "(mlflow server --host 127.0.0.1 --port PORT) or use a local store, e.g. "
                "--mlflow-uri sqlite:///mlflow.db") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent
        if not folder.is_dir():
            raise UsageError(f"--mlflow-uri {uri}: the folder {folder} does not exist")


def _health_request(uri: str) -> "urllib.request.Request":
    """The GET of ``URI/health``. Credentials in the URI (``https://USER:PASSWORD@host``, which
    MLflow's client turns into HTTP basic auth) go into an ``Authorization`` header: urllib
    cannot open a URL with a userinfo (it reads ``USER:PASSWORD@host`` as the host)."""
    import base64
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri.rstrip("/") + "/health")
    headers = {}
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        parts = parts._replace(netloc=host)
    return urllib.request.Request(urlunsplit(parts), headers=headers)


#: what an HTTP/2 (gRPC) client sends first (RFC 9113, section 3.4)
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def check_address(address: str | None) -> None:
    """A Ray address ``[ray://]HOST:PORT`` must accept a connection and answer as a gRPC server
    within CONNECT_TIMEOUT_S (``ray.init`` would retry for minutes). ``auto``/``local`` are left
    to Ray."""
    import socket
    from urllib.parse import urlsplit

    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise UsageError(f"--address {address}: expected HOST:PORT (the Ray head's GCS port, "
                         "e.g. 10.0.0.1:6379), ray://HOST:PORT or auto")
    hint = "start one (ray start --head) or leave --address out for a local Ray"
    try:
        conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise UsageError(f"--address {address}: no Ray head answers there "
                         f"({exc.strerror or exc or type(exc).__name__}); {hint}") from None
    header = b""
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS head: leave the handshake to Ray
        # Ray's head (GCS, Ray Client) is a gRPC server: it answers HTTP/2's connection preface
        # with a SETTINGS frame; another service there would make ray.init retry for minutes
        try:
            conn.sendall(_HTTP2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            while len(header) < 9:
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:  # reset or timed out: not a gRPC server
            pass
    if len(header) < 9 or header[3] != 0x04:  # frame type 4: SETTINGS
        raise UsageError(f"--address {address}: something listens there, but not a Ray head "
                         f"(no gRPC answer within {CONNECT_TIMEOUT_S:g} s); {hint}")


def study_storage_for(args: argparse.Namespace) -> str:
    """The Optuna study's RDB storage: $OPTUNA_STORAGE, else SQLite in the working directory.
    Only the driver opens it (the searcher and the pruning scheduler run there), so a SQLite
    file on a cluster's head node is enough for a driver on the head."""
    return os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{Path('optuna.db').resolve()}"



def ray_address(address: str | None) -> str:
    """The Ray a search runs on: ``--address``, else ``$RAY_ADDRESS``, else ``"local"`` (a new
    Ray of our own in this process)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


#: notices that a search hides unless -v (errors always show), by logger -> the level shown:
#: Ray's token-auth default of a local Ray (docs/safety.md says what it means), Tune's hints
#: that a step took long (a loaded machine), Optuna's "A new study created", MLflow's INFO lines
#: (database set-up, input-example validation, model registration: the summary says what
#: matters)
QUIET_LOGGERS = {"ray._private.authentication.authentication_token_setup": logging.ERROR,
                 "ray.tune.utils.util": logging.ERROR, "optuna": logging.WARNING,
                 "mlflow": logging.WARNING}


def quiet_startup(verbose: int) -> None:
    """Without ``-v``: the notices of :data:`QUIET_LOGGERS` hidden, and Tune's TensorBoard
    logger (and its "To visualize your results with TensorBoard" hint) not created
    (:func:`tune_loggers`)."""
    if verbose:
        return
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(level, logger.getEffectiveLevel()))


def init_ray(address: str | None, verbose: int = 0) -> None:
    """Start (or join) Ray unless it runs in this process already; a failure is a UsageError.

    ``"local"`` (the default without ``--address`` / ``$RAY_ADDRESS``) is a new Ray of our own,
    even where ``ray start`` left a cluster running that a plain ``ray.init()`` would join. A
    local Ray starts no dashboard; a cluster's dashboard is whatever ``ray start`` chose
    (127.0.0.1 unless --dashboard-host says otherwise)."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(address)
    quiet_startup(verbose)
    try:
        ray.init(address=address, log_to_driver=verbose > 0,
                 logging_level=logging.INFO if verbose else logging.WARNING,
                 include_dashboard=False if address == "local" else None)
    except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions (a start timeout)
        where = "local Ray" if address == "local" else f"--address {address}"
        raise UsageError(f"{where}: Ray did not start ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None


def exit_cli(code: int) -> None:
    """Leave a CLI that ran Ray, MLflow and torch without the interpreter's closing garbage
    collections: they walk the ~0.5 M objects those libraries leave behind, several times over,
    which took ~1.9 s after every search on our 2-core machine (py-spy: ``gc_collect_main`` until
    the process ends). ``gc.freeze`` exempts what exists now; atexit handlers (Ray's shutdown,
    logging) still run and reference counting still frees everything, and every MLflow, Optuna and
    checkpoint write is already committed when ``main`` returns."""
    import gc

    gc.freeze()
    sys.exit(code)


_OneLineParser = OneLineParser  # the name tuner.search used


def load_data(spec: str, nonfinite: str, unlabeled: str | None = None) -> MultimodalData:
    """The data of a command: :func:`resolve_data` with warnings as one line each."""
    return _load_data(spec, nonfinite, unlabeled)
