# SPDX-License-Identifier: LGPL-2.1-or-later
"""What the unit tests' scripts share about unix sockets."""

import socket


def listening(path):
    """True once a server listens on path: its socket file exists between bind() and listen(),
    when a connect is refused, so waiting for the file is not enough."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
