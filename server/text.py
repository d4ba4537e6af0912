"""Text that someone else wrote (an OAuth client's name, its id, its redirect URI), made safe to show: on a
terminal, ESC and the other control characters start escape sequences (OSC 0 sets the window title, OSC 52 writes
the clipboard, CSI moves the cursor to overwrite lines); in a page or a log they hide or fake text."""

from __future__ import annotations

import re

# C0 controls (tab and newline included: a name is one line), DEL, C1 controls (0x9B is a one-byte CSI), and the
# bidirectional overrides and isolates that reorder what is shown (Trojan Source, CVE-2021-42574).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """`text` with every control character replaced by U+FFFD (so that something visibly was there); ordinary
    Unicode (accents, CJK, emoji) is kept."""
    return _UNSAFE.sub("\ufffd", str(text))
