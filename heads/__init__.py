"""Stage two: heads trained and scored on cached features, and what uses the trained runs."""
