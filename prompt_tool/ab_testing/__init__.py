"""A/B tests of orchestration template versions: assignment, outcomes, results, promotion."""
