"""Rows shared by the subprocess scripts: 16 sums, each with one chosen and two rejected answers."""


def addition_rows() -> list[dict]:
    return [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": [str(a + b + 1), "x"]}
        for a in range(4)
        for b in range(4)
    ]
