"""The console summary a recipe prints: every reward before -> after, the KL (k3), and paired sample completions."""

from hf_rlhf_ext.run.finish import summary_text


def test_summary_lists_rewards_kl_and_paired_samples():
    metrics = {
        "num_eval_prompts": 8, "eval_sampling": "sample", "reward_funcs": ["proxy_reward", "gold_reward"],
        "proxy_reward_before": -0.1, "proxy_reward_after": 0.8, "gold_reward_before": 0.3, "gold_reward_after": 0.45,
        "kl_after": -0.2, "kl_k3_after": 0.7,  # k1 can come out negative; the headline is k3
        "samples_before": [{"prompt": "customer : p agent :", "completion": "deal with it ."}],
        "samples_after": [{"prompt": "customer : p agent :", "completion": "we will send a new kettle ."}],
    }
    text = summary_text(metrics)
    assert "-0.100 -> +0.800" in text and "+0.300 -> +0.450" in text
    assert "0.700 nats per completion (k3)" in text and "-0.200" not in text
    assert text.index("before: deal with it .") < text.index("after:  we will send a new kettle .")
    assert "gold_reward" in summary_text({**metrics, "proxy_reward_before": 0.0})
