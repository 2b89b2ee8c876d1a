"""The data the safety study reads: ToxiGen and CrowS-Pairs prompts, RealToxicityPrompts."""
