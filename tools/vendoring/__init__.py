"""vendor/<upstream>: the official upstream at its pinned commit, patched, with the overlay copied in."""
