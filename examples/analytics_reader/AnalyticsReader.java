// An analytics topic in the Schema Registry wire format, read by a program that knows nothing
// of esbridge or Python: Apache Kafka's Java client, Apache Avro, and the registry's REST API.
//
// Run it as a single source file (Java 17+ compiles it in memory), with kafka-clients and avro
// (and their dependencies: jackson, slf4j, lz4, snappy, zstd, commons-compress) on the classpath:
//
//   java -cp "avro-libs/*:kafka-libs/*" AnalyticsReader.java BOOTSTRAP TOPIC REGISTRY_URL
//
// It reads every partition of TOPIC from the start up to its last committed message
// (isolation.level=read_committed: never an aborted or still-open transaction), then exits.
// For each message it prints one JSON line: where it was, its key, its CloudEvents type and
// id (the ce_* headers), the id of the schema that wrote it, and the event's data decoded
// with that schema. The value is framed as every Confluent serializer frames it: a magic
// byte 0, the schema id (4 bytes, big-endian), then the data (Avro binary, or JSON text for
// a JSON Schema). The writer's schema is fetched once per id: GET {registry}/schemas/ids/{id}.

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.DecoderFactory;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class AnalyticsReader {
    static final ObjectMapper JSON = new ObjectMapper();
    static final JsonNodeFactory NODES = JsonNodeFactory.instance;

    /** A writer's schema, as the registry returned it: Avro (parsed) or JSON Schema. */
    record WriterSchema(String type, Schema avro) {}

    final HttpClient http = HttpClient.newHttpClient();
    final String registry;
    final Map<Integer, WriterSchema> schemas = new HashMap<>();

    AnalyticsReader(String registry) {
        this.registry = registry.replaceAll("/+$", "");
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: AnalyticsReader BOOTSTRAP TOPIC REGISTRY_URL");
            System.exit(2);
        }
        new AnalyticsReader(args[2]).readAll(args[0], args[1]);
    }

    void readAll(String bootstrap, String topic) throws Exception {
        Properties config = new Properties();
        config.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        config.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        config.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        config.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
        config.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(config)) {
            List<TopicPartition> partitions = new ArrayList<>();
            for (PartitionInfo info : consumer.partitionsFor(topic, Duration.ofSeconds(30))) {
                partitions.add(new TopicPartition(topic, info.partition()));
            }
            consumer.assign(partitions);
            consumer.seekToBeginning(partitions);
            // read_committed: the end is the last stable offset, past every committed message.
            Map<TopicPartition, Long> end = consumer.endOffsets(partitions, Duration.ofSeconds(30));
            long deadline = System.currentTimeMillis() + 60_000;
            while (!reachedEnd(consumer, end)) {
                if (System.currentTimeMillis() > deadline) {
                    throw new IllegalStateException("did not reach the end of " + topic + " in 60 s");
                }
                for (ConsumerRecord<byte[], byte[]> message : consumer.poll(Duration.ofMillis(500))) {
                    System.out.println(JSON.writeValueAsString(line(message)));
                }
            }
        }
    }

    static boolean reachedEnd(KafkaConsumer<byte[], byte[]> consumer, Map<TopicPartition, Long> end) {
        for (Map.Entry<TopicPartition, Long> entry : end.entrySet()) {
            if (consumer.position(entry.getKey()) < entry.getValue()) {
                return false;
            }
        }
        return true;
    }

    ObjectNode line(ConsumerRecord<byte[], byte[]> message) throws Exception {
        ByteBuffer value = ByteBuffer.wrap(message.value());
        if (value.remaining() < 5 || value.get() != 0) {
            throw new IllegalArgumentException(
                    "offset " + message.offset() + ": not in the Schema Registry wire format");
        }
        int schemaId = value.getInt(); // big-endian, as ByteBuffer reads by default
        ObjectNode line = NODES.objectNode();
        line.put("partition", message.partition());
        line.put("offset", message.offset());
        line.put("key", new String(message.key(), StandardCharsets.UTF_8));
        line.put("type", header(message, "ce_type"));
        line.put("id", header(message, "ce_id"));
        line.put("schema_id", schemaId);
        line.set("data", decode(schemaId, value));
        return line;
    }

    static String header(ConsumerRecord<byte[], byte[]> message, String name) {
        Header header = message.headers().lastHeader(name);
        return header == null ? null : new String(header.value(), StandardCharsets.UTF_8);
    }

    JsonNode decode(int schemaId, ByteBuffer body) throws Exception {
        WriterSchema schema = writerSchema(schemaId);
        byte[] bytes = new byte[body.remaining()];
        body.get(bytes);
        if (schema.avro() == null) { // JSON Schema: the data is JSON text
            return JSON.readTree(bytes);
        }
        GenericDatumReader<Object> reader = new GenericDatumReader<>(schema.avro());
        return toJson(reader.read(null, DecoderFactory.get().binaryDecoder(bytes, null)));
    }

    WriterSchema writerSchema(int id) throws Exception {
        WriterSchema known = schemas.get(id);
        if (known != null) {
            return known;
        }
        HttpRequest request = HttpRequest.newBuilder(URI.create(registry + "/schemas/ids/" + id))
                .header("Accept", "application/vnd.schemaregistry.v1+json")
                .build();
        HttpResponse<String> response = http.send(request, HttpResponse.BodyHandlers.ofString());
        if (response.statusCode() != 200) {
            throw new IllegalStateException(
                    "schema " + id + ": HTTP " + response.statusCode() + " " + response.body());
        }
        JsonNode body = JSON.readTree(response.body());
        String type = body.path("schemaType").asText("AVRO"); // absent means Avro
        Schema avro = type.equals("AVRO") ? new Schema.Parser().parse(body.get("schema").asText()) : null;
        WriterSchema schema = new WriterSchema(type, avro);
        schemas.put(id, schema);
        return schema;
    }

    /** An Avro generic value as JSON: records and maps as objects, unions as their value. */
    static JsonNode toJson(Object value) {
        if (value == null) {
            return NODES.nullNode();
        }
        if (value instanceof GenericRecord record) {
            ObjectNode object = NODES.objectNode();
            for (Schema.Field field : record.getSchema().getFields()) {
                object.set(field.name(), toJson(record.get(field.pos())));
            }
            return object;
        }
        if (value instanceof Map<?, ?> map) {
            ObjectNode object = NODES.objectNode();
            map.forEach((k, v) -> object.set(k.toString(), toJson(v)));
            return object;
        }
        if (value instanceof GenericData.Array<?> || value instanceof List<?>) {
            ArrayNode array = NODES.arrayNode();
            for (Object item : (List<?>) value) {
                array.add(toJson(item));
            }
            return array;
        }
        if (value instanceof Long n) {
            return NODES.numberNode(n);
        }
        if (value instanceof Integer n) {
            return NODES.numberNode(n);
        }
        if (value instanceof Double n) {
            return NODES.numberNode(n);
        }
        if (value instanceof Float n) {
            return NODES.numberNode(n);
        }
        if (value instanceof Boolean b) {
            return NODES.booleanNode(b);
        }
        return NODES.textNode(value.toString()); // strings (Utf8) and enum symbols
    }
}
