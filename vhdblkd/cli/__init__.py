"""vhdblkctl: the command-line tool."""
