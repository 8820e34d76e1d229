"""Reports to text: every command's report as rows (label, lines), drawn by one plain
renderer for pipes and logs and one rich renderer for terminals; JSON documents.

Everything shown is computed by the library already; rendering only chooses words and
layout. Plain text is stable (no colour, no box drawing) so logs and tests can rely on
it; rich is imported only when drawing for a terminal.
"""
