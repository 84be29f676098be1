"""Verifiable tasks: built-in task families whose answers a program can check, and the rule and
function rewards that check them.

- ``arithmetic``: multi-digit arithmetic and short word problems, answered as ``Answer: 42``;
- ``tool_use``: price look-ups and a calculator called with JSON tool calls over several turns;
- ``string_transform``: write a small Python string function, checked by running it in a sandbox.

Every family generates problems deterministically from a seed, and a hash of each problem's
canonical form decides its split (``common.split_of``), so train and held-out never share a problem,
whatever seeds generated them. ``files.write_task_files`` writes a family as an eval task (YAML +
JSONL), SFT data, preference pairs and an RL prompt set; ``rewards.Reward`` scores completions
with a reward spec (a named rule, a family's checker, or a user's Python function run in a child
process with a timeout), and ``actors/rule_reward.py`` is its Ray actor pool.
"""
