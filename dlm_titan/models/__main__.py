"""``python -m dlm_titan.models``: print every SMDM flavor with its shape and parameter counts."""

from dlm_titan.models.flavors import FLAVORS, get_model_args


def main() -> None:
    header = f"{'flavor':>7} {'layers':>6} {'heads':>5} {'dim':>5} {'ffn':>5} {'head_dim':>8} {'non-emb N':>15} {'total':>15}"
    print(header)
    print("-" * len(header))
    for name in FLAVORS:
        a = get_model_args(name)
        print(
            f"{name:>7} {a.n_layers:>6} {a.n_heads:>5} {a.dim:>5} {a.ffn_dim:>5} {a.head_dim:>8} "
            f"{a.non_embedding_params():>15,} {a.total_params():>15,}"
        )
    print('\n"1B" is an alias of "1028M". Embedding rows = vocab + 1 (the mask token); the head is untied.')


if __name__ == "__main__":
    main()
