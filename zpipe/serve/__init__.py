"""An OpenAI-compatible HTTP API and a live dashboard in front of a zpipe broker
(``zpipe serve``; see ``zpipe.serve.app``)."""
