"""Does an edit work, and what does it cost: toxicity scorers, the RTP protocol, bootstrap
statistics, and the sweep and selection of edits."""
