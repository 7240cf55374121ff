"""`radixlm router`: one HTTP front for several `radixlm serve` workers, routing by their caches."""
