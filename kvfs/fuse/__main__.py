"""The detached mount server started by ``kvfs mount`` (``python -m kvfs.fuse --ready-fd N``).

Reads its configuration as JSON on stdin, mounts, then writes ``ready <pid>``
(or ``error <reason>``) on the ready fd and closes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvfs.fuse")
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    config = json.loads(sys.stdin.read())
    logging.basicConfig(level=logging.DEBUG if config.get("debug") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ._control import remove_pid_file, write_pid_file
    from ._serve import serve

    fd: int | None = args.ready_fd

    def say(message: str) -> None:
        nonlocal fd
        if fd is None:
            return
        try:
            os.write(fd, (message.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        os.close(fd)
        fd = None

    def ready() -> None:
        write_pid_file(config["mountpoint"])
        os.chdir("/")  # hold no directory busy
        say(f"ready {os.getpid()}")

    try:
        serve(config["url"], config["mountpoint"], read_write=config.get("read_write", False),
              allow_other=config.get("allow_other", False), debug=config.get("debug", False),
              io_timeout=config.get("io_timeout", 120.0), on_ready=ready)
    except BaseException as e:  # noqa: BLE001 - report any failure to the waiting `kvfs mount`
        from ..errors import KVFSError

        expected = isinstance(e, (OSError, KVFSError, ImportError))
        logging.getLogger("kvfs.fuse").error("kvfs mount server failed: %s", e, exc_info=not expected)
        say(f"error {e}")
        return 1
    finally:
        remove_pid_file(config["mountpoint"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
