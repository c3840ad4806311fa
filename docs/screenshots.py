"""Take the dashboard screenshots in docs/ (SVG, Textual's save_screenshot) from a stored session.

    python docs/screenshots.py RESULTS_DIR [--session ID] [--out docs]

Opens the dashboard on RESULTS_DIR, opens the session (default: the latest) as `o` does, and
saves dashboard-120x40.svg (loss curves of every run and the time-to-aligned-model bars),
dashboard-loss-80x24.svg and dashboard-cost-80x24.svg.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from vqabench.store import ResultsStore
from vqabench.tui.app import Dashboard
from vqabench.tui.state import SessionView

#: (file name, terminal size, keys pressed after the session opens)
SHOTS = (
    ("dashboard-120x40.svg", (120, 40), "bb"),
    ("dashboard-loss-80x24.svg", (80, 24), "2"),
    ("dashboard-cost-80x24.svg", (80, 24), "3bb"),
)


async def shoot(results: Path, session_id: int | None, out: Path, name: str, size: tuple[int, int], keys: str) -> None:
    with ResultsStore(results, create=False) as store:
        session = store.session(session_id) if session_id is not None else store.last_session()
        assert session is not None, f"{results} holds no session"
        app = Dashboard(store, selection="all")
        async with app.run_test(size=size) as pilot:
            app._show_view(SessionView.from_store(store, session))
            await pilot.pause(0.5)
            for key in keys:
                await pilot.press(key)
                await pilot.pause(0.3)
            app.save_screenshot(name, str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--session", type=int)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    for name, size, keys in SHOTS:
        asyncio.run(shoot(args.results, args.session, args.out, name, size, keys))
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
