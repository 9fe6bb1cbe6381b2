"""Command line: ``python -m lightning_lens report LOG_DIR [-o report.html]``.

``report`` builds one self-contained HTML page (images embedded, no network) from what the lightning-lens callbacks
logged under ``LOG_DIR`` (TensorBoard event files or the file sink's artifacts); see
:mod:`lightning_lens.report.html`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_lens", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="build a self-contained HTML page from a log directory")
    report.add_argument("log_dir", help="the folder given to the logger, e.g. lens_logs")
    report.add_argument("-o", "--output", default=None, help="the HTML file to write (default: LOG_DIR/report.html)")
    report.add_argument("--max-steps", type=int, default=6,
                        help="logged steps of each saliency map to show, spread over the run (default 6)")
    args = parser.parse_args(argv)
    if args.max_steps < 2:
        parser.error(f"--max-steps must be at least 2 (the first and the last step), got {args.max_steps}")
    from lightning_lens.report.html import write_report

    try:
        path = write_report(args.log_dir, args.output, max_steps=args.max_steps)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    sys.stdout.write(f"Report written to {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
