"""Where the checkout's folders are, for tests that read deploy files or run commands in it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
