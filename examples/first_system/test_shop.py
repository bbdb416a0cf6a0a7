"""Shop and Invoices over a real Kafka broker and a real PostgreSQL."""

from esbridge import KafkaRunner

from shop import Invoices, Shop, system


def test_every_order_gets_an_invoice(postgres_db, kafka_config, topic_name):
    runner = KafkaRunner(
        system,
        env=postgres_db.env,  # this test's own database
        kafka_config=kafka_config,  # the test session's broker
        topic_prefix=f"{topic_name}.",  # topics of this test's own
    )
    with runner:
        shop = runner.get(Shop)
        ada = shop.place_order("Ada", 1250)
        shop.place_order("Grace", 990)

        runner.wait_idle(timeout=30)  # until Invoices has processed every order

        invoice = runner.get(Invoices).invoice_for(ada)
        assert (invoice.customer, invoice.amount) == ("Ada", 1250)
        (edge,) = runner.statuses()
        assert (edge.leader, edge.follower, edge.lag_events) == ("Shop", "Invoices", 0)
