"""What the commands run: the whole config composed, then one function per command (extract, train-head,
evaluate, sweep, demo) and the leaderboard over runs."""
