"""Run the real twistd, saving coverage data on shutdown (twistd re-raises SIGTERM, which
would otherwise kill the process before coverage's atexit hook can write its data)."""

from __future__ import annotations


def main() -> None:
    from twisted.internet import reactor
    from twisted.scripts.twistd import run

    def save_coverage() -> None:
        try:
            import coverage
        except ImportError:  # pragma: no cover - coverage is a test dependency
            return
        current = coverage.Coverage.current()
        if current is not None:
            current.stop()
            current.save()

    reactor.addSystemEventTrigger("after", "shutdown", save_coverage)
    run()


if __name__ == "__main__":
    main()
