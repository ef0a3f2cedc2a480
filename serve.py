"""
Talk to a model in the browser, or point OpenAI clients at it: a local web server with a chat page
(and a "why" view of each generated token) and an OpenAI-compatible API.

    python serve.py (--ckpt RUN | --init-from gpt2) [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                    [--max-batch 16] [--max-queue 64] [--max-tokens 4096] [--timeout 600]
                    [--cors-origin URL ...] [--device auto] [--dtype auto]

Open http://127.0.0.1:8000/ for the page: a chat for a chat model (one fine-tuned on chat data), a
completion box for a base model; click a generated token to see the alternatives the model weighed at
that step and where each layer's heads looked. The API at http://127.0.0.1:8000/v1 speaks OpenAI's
chat completions (chat models), completions (every model) and models, streaming included; see
docs/serving.md. A chat model with the tool tokens runs its calculator calls in chat completions (the
reply's text is the final text; the calls come in a nanoforge_calculator field, and the page shows them). Up to
--max-batch requests are decoded together, each joining as soon as a place is free and leaving as soon as it
is done (continuous batching); past --max-queue waiting requests the server answers 503 with Retry-After. A
request may ask for up to --max-tokens tokens and takes at most --timeout seconds. It listens on 127.0.0.1
only, unless --host says otherwise; with --api-key every request but the page and /health needs
"Authorization: Bearer KEY". Web pages of other origins may call it only when
--cors-origin names them.
"""

import ipaddress
import os
import socket
import sys

from nanoforge import cli, loading
from nanoforge.config import ConfigError
from nanoforge.device import resolve_device, resolve_dtype
from nanoforge.batching import POLICIES
from nanoforge.engine import Generator
from nanoforge.openai_api import MAX_TOKENS
from nanoforge.errors import UserError


def model_name(args):
    """The name clients ask for: the run directory's name, or the GPT-2 model's."""
    if args.init_from:
        return os.path.basename(os.path.normpath(args.init_from))
    path = os.path.abspath(args.ckpt)
    return os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))


def check_args(args):
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be above 0 seconds, got {args.timeout}")
    for origin in args.cors_origin:
        if not origin.startswith(("http://", "https://")) or origin.endswith("/") or origin.count("/") != 2:
            raise ConfigError(f"--cors-origin must be an origin such as https://app.example:8080 (scheme, host and "
                              f"port, no path), got {origin!r}")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty: give the key clients must send, or leave the flag out")


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(host, port):
    """A listening socket, bound before the model loads so that a busy port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port") from None
    return sock


@cli.command
def main(argv=None):
    parser = cli.parser(__doc__)
    cli.add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; another address lets other machines in)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but / and /health")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a place; past "
                        "this the server answers 503 (default 64)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="the most tokens a request may ask "
                        f"for (default {MAX_TOKENS}; reported in /v1/models)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, waiting "
                        "included; then it ends with what it has (default 600)")
    parser.add_argument("--cors-origin", action="append", default=[], help="a web page origin allowed to call "
                        "the API from a browser, such as https://app.example (repeatable; default: the page "
                        "this server serves only)")
    parser.add_argument("--batching", choices=POLICIES, default="continuous", help="continuous (default), or "
                        "static: a new batch starts only when the last is done (the baseline "
                        "bench/serve_speed.py compares against)")
    cli.add_device_arguments(parser)
    args = parser.parse_args(argv)
    check_args(args)
    try:
        import uvicorn

        from nanoforge.server import Service, create_app, host_names
    except ImportError as e:
        raise UserError(f"serving needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'") from None
    if not is_loopback(args.host):
        print(f"serve.py: warning: listening on {args.host}: other machines can reach this server"
              + ("" if args.api_key else " and use it without a key (--api-key)"), file=sys.stderr)
    sock = listen(args.host, args.port)
    device = resolve_device(args.device)
    model, tokenizer = loading.load_model_from_args(args, device)
    model = model.to(resolve_dtype(args.dtype, device.type))
    service = Service(Generator(model, tokenizer), model, model_name(args), args.max_batch, args.max_queue,
                      args.api_key, args.max_tokens, args.timeout, args.batching)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving '{service.name}' ({'chat' if service.chat else 'base'} model, {device.type}, "
          f"{str(next(model.parameters()).dtype).removeprefix('torch.')}): page {url}/  API {url}/v1",
          file=sys.stderr, flush=True)
    app = create_app(service, host_names(host, port), args.cors_origin)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
