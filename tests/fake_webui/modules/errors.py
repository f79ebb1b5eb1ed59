"""modules.errors: report prints and goes on, as the WebUI's does."""

import sys
import traceback


def report(message, *, exc_info=False):
    print(message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e, task, *, full_traceback=False):
    print(f"{task}: {type(e).__name__}: {e}", file=sys.stderr)
