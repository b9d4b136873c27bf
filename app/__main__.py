"""`python -m app`: start the QLoRA Studio web UI (launch.py sets up the environment, then runs this)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python launch.py", description="QLoRA Studio web UI")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public link")
    parser.add_argument("--auth", help="require a login, as user:password")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("--data-dir", help="where runs, uploads and the model cache live (default ./data)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow --host/--share without --auth (anyone who reaches it can use it)")
    args = parser.parse_args(argv)
    if args.auth and ":" not in args.auth:
        parser.error("--auth takes user:password")
    return args


def exposure_warning(args: argparse.Namespace) -> str:
    """A warning when the app is reachable beyond this machine without a login, else ''."""
    if args.auth:
        return ""
    if args.share:
        return "WARNING: --share publishes this app on a public link without --auth: anyone with the " \
               "link can train and chat on your GPU and read your data. Add --auth user:password."
    if args.host not in LOCAL_HOSTS:
        return f"WARNING: listening on {args.host} without --auth: anyone on your network can use " \
               "this app and read your data. Add --auth user:password."
    return ""


def exposure_refusal(args: argparse.Namespace) -> str:
    """Why the app will not start (exposed without a login and without --insecure), else ''."""
    if not exposure_warning(args) or args.insecure:
        return ""
    return exposure_warning(args).replace("WARNING: ", "Refusing to start: ", 1) + \
        " (or, if you really mean it, add --insecure)"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no calls home from a local tool
    if args.data_dir:
        os.environ["QLS_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    refusal = exposure_refusal(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr)

    # The app's own warnings (failed logins, ...) go to stderr with where they came from.
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from app.login import FREE_FAILURES, MAX_DELAY_S, throttled_login
    from app.main import build_ui
    from engine.paths import data_dir
    from engine.readers import max_upload_bytes

    data_dir().mkdir(parents=True, exist_ok=True)
    demo = build_ui()
    auth, app_kwargs, auth_message = None, {}, None
    if args.auth:
        auth, app_kwargs = throttled_login(*args.auth.split(":", 1))
        # Gradio's login page shows nothing for a refused (429) login, so it says so up front.
        auth_message = (f"After {FREE_FAILURES} failed logins, logins from your address are refused "
                        f"for a growing delay (up to {MAX_DELAY_S / 60:.0f} minutes): if the login "
                        "button does nothing, wait and try again.")
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"QLoRA Studio: http://{shown_host}:{args.port}  (data in {data_dir()})", flush=True)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        auth_message=auth_message,
        app_kwargs=app_kwargs,
        inbrowser=not args.no_browser,
        allowed_paths=[str(data_dir())],  # with Gradio's own upload cache, the only files it serves
        max_file_size=max_upload_bytes(),  # refused at the HTTP layer, before it reaches the disk
        show_error=True,
        quiet=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
