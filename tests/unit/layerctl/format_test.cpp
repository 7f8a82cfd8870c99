// tools/layerctl/format: answer interpretation and human output.
#include "format.hpp"

#include <gtest/gtest.h>

using nlohmann::json;
using namespace layerctl;

TEST(AnswerError, ErrFieldWithAnyStatus) {
  EXPECT_EQ(answer_error(200, R"({"Err":"layer x: no such layer"})"), "layer x: no such layer");
  EXPECT_EQ(answer_error(500, R"({"Err":"boom"})"), "boom");
  // An empty Err is success, as dockerd reads it.
  EXPECT_EQ(answer_error(200, R"({"Err":"","Dir":"/x"})"), std::nullopt);
  EXPECT_EQ(answer_error(200, R"({"Exists":false})"), std::nullopt);
  EXPECT_EQ(answer_error(200, ""), std::nullopt);
  EXPECT_EQ(answer_error(200, "tar bytes"), std::nullopt);
}

TEST(AnswerError, HttpStatusWithoutErr) {
  EXPECT_EQ(answer_error(404, "not found\n"), "HTTP 404: not found");
  EXPECT_EQ(answer_error(403, ""), "HTTP 403");
  EXPECT_EQ(answer_error(400, R"({"error":"bad json"})"), "HTTP 400: bad json");
}

TEST(ParseAnswer, EmptyIsObjectAndGarbageThrows) {
  EXPECT_EQ(parse_answer(""), json::object());
  EXPECT_EQ(parse_answer("{\"Size\":3}\n")["Size"], 3);
  EXPECT_THROW((void)parse_answer("<html>"), std::runtime_error);
}

TEST(Prometheus, SamplesLabelsAndEscapes) {
  json samples = parse_prometheus(
      "# HELP layerd_requests_total Requests\n"
      "# TYPE layerd_requests_total counter\n"
      "layerd_requests_total{route=\"/GraphDriver.Get\",status=\"200\"} 12\n"
      "layerd_active_mounts 3\n"
      "\n"
      "layerd_seconds_bucket{le=\"+Inf\"} 7 1700000000000\n"
      "weird{msg=\"a \\\"q\\\" \\\\ b\\nc\"} 1.5e3\n"
      "inf_value +Inf\n");
  ASSERT_EQ(samples.size(), 5u);
  EXPECT_EQ(samples[0]["name"], "layerd_requests_total");
  EXPECT_EQ(samples[0]["labels"]["route"], "/GraphDriver.Get");
  EXPECT_EQ(samples[0]["labels"]["status"], "200");
  EXPECT_EQ(samples[0]["value"], 12.0);
  EXPECT_EQ(samples[1]["labels"], json::object());
  EXPECT_EQ(samples[2]["labels"]["le"], "+Inf");
  EXPECT_EQ(samples[2]["value"], 7.0);
  EXPECT_EQ(samples[3]["labels"]["msg"], "a \"q\" \\ b\nc");
  EXPECT_EQ(samples[3]["value"], 1500.0);
  EXPECT_EQ(samples[4]["value"], "+Inf");
  EXPECT_THROW((void)parse_prometheus("x{a=\"b\" 1\n"), std::runtime_error);
  EXPECT_THROW((void)parse_prometheus("x notanumber\n"), std::runtime_error);
  EXPECT_THROW((void)parse_prometheus("x\n"), std::runtime_error);
}

TEST(Format, StatusPairsAligned) {
  json status = json::parse(R"([["Backing Filesystem","extfs"],["Layers","3"]])");
  EXPECT_EQ(format_pairs(status), "Backing Filesystem:  extfs\nLayers:              3\n");
  EXPECT_EQ(format_metadata(json::parse(R"({"MergedDir":"/m","UpperDir":"/u"})")),
            "MergedDir:  /m\nUpperDir:   /u\n");
}

TEST(Format, ChangesLikeDockerDiff) {
  json changes = json::parse(R"([{"Path":"/etc","Kind":0},{"Path":"/etc/new","Kind":1},{"Path":"/old","Kind":2}])");
  EXPECT_EQ(format_changes(changes), "C /etc\nA /etc/new\nD /old\n");
  EXPECT_EQ(format_changes(json::array()), "");
}

TEST(Format, LayersTable) {
  json layers = json::parse(
      R"([{"id":"base","parent":"","mounted":false,"refcount":0,"server_pid":0,"state":"unmounted"},
          {"id":"c1","parent":"base","mounted":true,"refcount":2,"server_pid":4242,"state":"mounted"}])");
  std::string table = format_layers(layers);
  EXPECT_EQ(table,
            "ID    PARENT  STATE      MOUNTED  REFS  PID\n"
            "base  -       unmounted  false    0     -\n"
            "c1    base    mounted    true     2     4242\n");
  // Also accepted wrapped in an object.
  EXPECT_EQ(format_layers(json{{"layers", layers}}), table);
}

TEST(Format, EventLine) {
  std::string line = format_event(json::parse(R"({"time":0.25,"type":"mount","layer":"c1","detail":"pid 7"})"));
  EXPECT_NE(line.find(".250 mount c1 pid 7\n"), std::string::npos) << line;
}

TEST(Format, BytesAndProgress) {
  EXPECT_EQ(format_bytes(512), "512 B");
  EXPECT_EQ(format_bytes(1536), "1.5 KiB");
  EXPECT_EQ(format_bytes(3.0 * 1024 * 1024 * 1024), "3.0 GiB");
  EXPECT_EQ(format_progress(1024 * 1024, std::nullopt, 2.0), "1.0 MiB sent  512.0 KiB/s");
  std::string bar = format_progress(50, 100, 1.0);
  EXPECT_NE(bar.find("[###############...............]  50%"), std::string::npos) << bar;
  EXPECT_NE(bar.find("50 B / 100 B"), std::string::npos) << bar;
}
