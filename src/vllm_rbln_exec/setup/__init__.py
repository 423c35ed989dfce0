"""Setup: what the user asked (options, checks, prompts), device profiles, models, and the typed sides and worker requests built from them."""
