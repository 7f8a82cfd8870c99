// The layerctl binary (path in $LAYERCTL, set by meson) run as a real process against a scripted
// server on a real unix socket: requests it sends, output, --json, streaming, exit codes.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "script_server.hpp"

extern char** environ;

using nlohmann::json;
using layerd::tools::testing::http_answer;
using layerd::tools::testing::RecordedRequest;
using layerd::tools::testing::ScriptedAnswer;
using layerd::tools::testing::ScriptServer;

namespace {

struct CliRun {
  int rc = -1;
  std::string out;
  std::string err;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class TempDir {
 public:
  TempDir() {
    char t[] = "/tmp/layerctl-cli-XXXXXX";
    path_ = ::mkdtemp(t);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  [[nodiscard]] std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs layerctl with `args`; stdin from `stdin_data` (through a file, so it is not a terminal).
CliRun layerctl(std::vector<std::string> args, const std::string& stdin_data = "") {
  const char* exe = std::getenv("LAYERCTL");
  if (exe == nullptr) throw std::runtime_error("LAYERCTL is not set (run through meson test)");
  TempDir dir;
  {
    std::ofstream in(dir.file("in"), std::ios::binary);
    in << stdin_data;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, dir.file("in").c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, dir.file("out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&actions, 2, dir.file("err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  std::vector<char*> argv;
  std::string name = "layerctl";
  argv.push_back(name.data());
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, exe, &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("posix_spawn failed");
  int status = 0;
  (void)waitpid(pid, &status, 0);
  CliRun run;
  run.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  run.out = slurp(dir.file("out"));
  run.err = slurp(dir.file("err"));
  return run;
}

// A server that answers plugin calls like a tiny layer store.
ScriptedAnswer fake_daemon(const RecordedRequest& r) {
  json body = json::parse(r.body, nullptr, false);
  std::string id = body.is_object() ? body.value("ID", "") : "";
  if (r.url == "/GraphDriver.Exists") return {http_answer(200, json{{"Exists", id == "yes"}}.dump())};
  if (r.url == "/GraphDriver.Get") return {http_answer(200, json{{"Dir", "/mnt/" + id}}.dump())};
  if (r.url == "/GraphDriver.Put" || r.url == "/GraphDriver.CreateReadWrite") {
    return {http_answer(200, "{}")};
  }
  if (r.url == "/GraphDriver.Create") {
    if (id == "dup") return {http_answer(200, R"({"Err":"layer dup already exists"})")};
    return {http_answer(200, "{}")};
  }
  if (r.url == "/GraphDriver.Remove") return {http_answer(500, R"({"Err":"layer busy"})")};
  if (r.url == "/GraphDriver.Status") return {http_answer(200, R"({"Status":[["Home","/h"],["Mounts","2"]]})")};
  if (r.url == "/GraphDriver.GetMetadata") return {http_answer(200, R"({"Metadata":{"UpperDir":"/u"}})")};
  if (r.url == "/GraphDriver.Changes") return {http_answer(200, R"({"Changes":[{"Path":"/a","Kind":1}]})")};
  if (r.url == "/GraphDriver.DiffSize") return {http_answer(200, R"({"Size":1234})")};
  if (r.url == "/GraphDriver.Diff") {
    if (id == "missing") return {http_answer(404, R"({"Err":"no such layer"})")};
    // A chunked tar-like stream.
    std::string out = "HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 100; ++i) out += "400\r\n" + std::string(1024, static_cast<char>('A' + i % 26)) + "\r\n";
    out += "0\r\n\r\n";
    return {out};
  }
  if (r.url.rfind("/GraphDriver.ApplyDiff?", 0) == 0) {
    return {http_answer(200, json{{"Size", r.body.size()}}.dump())};
  }
  if (r.url == "/v1/health") return {http_answer(200, R"({"status":"ok"})")};
  if (r.url == "/v1/layers") {
    return {http_answer(200, R"([{"id":"a","parent":"","mounted":true,"refcount":1,"server_pid":9,"state":"mounted"}])")};
  }
  if (r.url == "/metrics") return {http_answer(200, "# TYPE m counter\nm{a=\"b\"} 2\n", "text/plain")};
  if (r.url == "/v1/events") {
    return {"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            "1d\r\n{\"type\":\"mount\",\"layer\":\"a\"}\n\r\n"
            "1f\r\n{\"type\":\"unmount\",\"layer\":\"a\"}\n\r\n0\r\n\r\n",
            true};
  }
  return {http_answer(404, "unknown route\n", "text/plain")};
}

}  // namespace

TEST(LayerctlCli, UsageErrorsExit2) {
  EXPECT_EQ(layerctl({}).rc, 2);
  EXPECT_EQ(layerctl({"exists"}).rc, 2);           // missing ID
  EXPECT_EQ(layerctl({"frobnicate"}).rc, 2);       // unknown subcommand
  EXPECT_EQ(layerctl({"--timeout", "-1", "health"}).rc, 2);
  CliRun help = layerctl({"--help"});
  EXPECT_EQ(help.rc, 0);
  EXPECT_NE(help.out.find("Exit codes"), std::string::npos);
  CliRun sub_help = layerctl({"apply", "--help"});
  EXPECT_EQ(sub_help.rc, 0);
  EXPECT_NE(sub_help.out.find("--input"), std::string::npos);
}

TEST(LayerctlCli, CannotConnectExit3) {
  CliRun r = layerctl({"--socket", "/nonexistent/x.sock", "health"});
  EXPECT_EQ(r.rc, 3);
  EXPECT_NE(r.err.find("/nonexistent/x.sock"), std::string::npos) << r.err;
  // The environment variable works too, and flags may follow the subcommand.
  ::setenv("LAYERD_SOCKET", "/nonexistent/y.sock", 1);
  CliRun env = layerctl({"status"});
  ::unsetenv("LAYERD_SOCKET");
  EXPECT_EQ(env.rc, 3);
  EXPECT_NE(env.err.find("/nonexistent/y.sock"), std::string::npos) << env.err;
}

TEST(LayerctlCli, PluginCallsAndExitCodes) {
  ScriptServer server(fake_daemon);
  const std::string s = server.path();
  CliRun yes = layerctl({"exists", "yes", "--socket", s});
  EXPECT_EQ(yes.rc, 0);
  EXPECT_EQ(yes.out, "yes\n");
  CliRun no = layerctl({"--socket", s, "exists", "nope"});
  EXPECT_EQ(no.rc, 1);
  EXPECT_EQ(no.out, "no\n");
  CliRun mount = layerctl({"--socket", s, "mount", "L1"});
  EXPECT_EQ(mount.rc, 0);
  EXPECT_EQ(mount.out, "/mnt/L1\n");
  EXPECT_EQ(layerctl({"--socket", s, "create", "c", "--parent", "p"}).rc, 0);
  EXPECT_EQ(layerctl({"--socket", s, "create-rw", "c2", "-p", "p", "--storage-opt", "size=10G"}).rc, 0);
  CliRun dup = layerctl({"--socket", s, "create", "dup"});
  EXPECT_EQ(dup.rc, 4);
  EXPECT_NE(dup.err.find("layer dup already exists"), std::string::npos) << dup.err;
  CliRun busy = layerctl({"--socket", s, "rm", "x"});
  EXPECT_EQ(busy.rc, 4);
  EXPECT_NE(busy.err.find("layer busy"), std::string::npos) << busy.err;
  EXPECT_EQ(layerctl({"--socket", s, "umount", "L1"}).rc, 0);
  EXPECT_EQ(layerctl({"--socket", s, "status"}).out, "Home:    /h\nMounts:  2\n");
  EXPECT_EQ(layerctl({"--socket", s, "inspect", "L1"}).out, "UpperDir:  /u\n");
  EXPECT_EQ(layerctl({"--socket", s, "changes", "L1", "-p", "P"}).out, "A /a\n");
  EXPECT_EQ(layerctl({"--socket", s, "diff-size", "L1"}).out, "1234\n");

  // The requests are exactly dockerd's.
  auto requests = server.requests();
  auto find = [&](const std::string& url) -> const RecordedRequest* {
    for (const auto& r : requests) {
      if (r.url == url) return &r;
    }
    return nullptr;
  };
  ASSERT_NE(find("/GraphDriver.Exists"), nullptr);
  EXPECT_EQ(find("/GraphDriver.Exists")->body, "{\"ID\":\"yes\"}\n");
  EXPECT_EQ(find("/GraphDriver.Create")->body, "{\"ID\":\"c\",\"Parent\":\"p\"}\n");
  EXPECT_EQ(find("/GraphDriver.CreateReadWrite")->body,
            "{\"ID\":\"c2\",\"Parent\":\"p\",\"StorageOpt\":{\"size\":\"10G\"}}\n");
  EXPECT_EQ(find("/GraphDriver.Put")->body, "{\"ID\":\"L1\"}\n");
  EXPECT_EQ(find("/GraphDriver.Status")->body, "{}\n");
  EXPECT_EQ(find("/GraphDriver.Changes")->body, "{\"ID\":\"L1\",\"Parent\":\"P\"}\n");
}

TEST(LayerctlCli, JsonOutputIsTheAnswer) {
  ScriptServer server(fake_daemon);
  const std::string s = server.path();
  CliRun status = layerctl({"--socket", s, "--json", "status"});
  EXPECT_EQ(status.rc, 0);
  EXPECT_EQ(json::parse(status.out)["Status"][1][1], "2");
  CliRun no = layerctl({"--socket", s, "exists", "n", "--json"});
  EXPECT_EQ(no.rc, 1);
  EXPECT_EQ(json::parse(no.out)["Exists"], false);
  CliRun err = layerctl({"--socket", s, "--json", "rm", "x"});
  EXPECT_EQ(err.rc, 4);
  EXPECT_EQ(json::parse(err.out)["Err"], "layer busy");
  CliRun health = layerctl({"--socket", s, "--json", "health"});
  EXPECT_EQ(health.rc, 0);
  EXPECT_EQ(json::parse(health.out)["status"], "ok");
  CliRun layers = layerctl({"--socket", s, "--json", "layers"});
  EXPECT_EQ(json::parse(layers.out)[0]["server_pid"], 9);
  CliRun human_layers = layerctl({"--socket", s, "layers"});
  EXPECT_NE(human_layers.out.find("a   -       mounted  true     1     9\n"), std::string::npos)
      << human_layers.out;
  CliRun metrics = layerctl({"--socket", s, "--json", "metrics"});
  EXPECT_EQ(json::parse(metrics.out)[0]["labels"]["a"], "b");
  EXPECT_EQ(layerctl({"--socket", s, "metrics"}).out, "# TYPE m counter\nm{a=\"b\"} 2\n");
}

TEST(LayerctlCli, DiffStreamsToFileOrStdout) {
  ScriptServer server(fake_daemon);
  TempDir dir;
  CliRun to_file = layerctl({"--socket", server.path(), "diff", "L", "-p", "P", "-o", dir.file("l.tar")});
  EXPECT_EQ(to_file.rc, 0) << to_file.err;
  std::string tar = slurp(dir.file("l.tar"));
  ASSERT_EQ(tar.size(), 100u * 1024);
  EXPECT_EQ(tar[0], 'A');
  EXPECT_EQ(tar[1024 * 27], 'B');
  CliRun to_stdout = layerctl({"--socket", server.path(), "diff", "L"});
  EXPECT_EQ(to_stdout.out, tar);
  // A failed Diff leaves no file behind.
  CliRun missing = layerctl({"--socket", server.path(), "diff", "missing", "-o", dir.file("m.tar")});
  EXPECT_EQ(missing.rc, 4);
  EXPECT_NE(missing.err.find("no such layer"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir.file("m.tar")));
}

TEST(LayerctlCli, ApplyStreamsChunkedFromStdinOrFile) {
  ScriptServer server(fake_daemon);
  std::string tar(3 * 1024 * 1024 + 17, 'x');
  CliRun from_stdin = layerctl({"--socket", server.path(), "apply", "L", "--parent", "P"}, tar);
  EXPECT_EQ(from_stdin.rc, 0) << from_stdin.err;
  EXPECT_EQ(from_stdin.out, std::to_string(tar.size()) + "\n");
  TempDir dir;
  {
    std::ofstream f(dir.file("t.tar"), std::ios::binary);
    f << "small tar";
  }
  CliRun from_file = layerctl({"--socket", server.path(), "--json", "apply", "B", "-i", dir.file("t.tar")});
  EXPECT_EQ(from_file.rc, 0) << from_file.err;
  EXPECT_EQ(json::parse(from_file.out)["Size"], 9);
  auto requests = server.requests();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_EQ(requests[0].url, "/GraphDriver.ApplyDiff?id=L&parent=P");
  EXPECT_TRUE(requests[0].chunked);
  EXPECT_EQ(requests[0].body, tar);
  EXPECT_EQ(requests[1].url, "/GraphDriver.ApplyDiff?id=B&parent=");
  CliRun no_file = layerctl({"--socket", server.path(), "apply", "B", "-i", dir.file("absent")});
  EXPECT_EQ(no_file.rc, 5);
}

TEST(LayerctlCli, EventsStreamLines) {
  ScriptServer server(fake_daemon);
  CliRun raw = layerctl({"--socket", server.path(), "--json", "events"});
  EXPECT_EQ(raw.rc, 0) << raw.err;
  EXPECT_EQ(raw.out, "{\"type\":\"mount\",\"layer\":\"a\"}\n{\"type\":\"unmount\",\"layer\":\"a\"}\n");
  CliRun human = layerctl({"--socket", server.path(), "events"});
  EXPECT_EQ(human.out, "mount a\nunmount a\n");
}

TEST(LayerctlCli, UnknownRouteIsDaemonError) {
  // A daemon without native routes answers 404: exit 4 with the cause.
  ScriptServer server([](const RecordedRequest&) {
    return ScriptedAnswer{http_answer(404, "no route\n", "text/plain")};
  });
  CliRun r = layerctl({"--socket", server.path(), "health"});
  EXPECT_EQ(r.rc, 4);
  EXPECT_NE(r.err.find("HTTP 404: no route"), std::string::npos) << r.err;
}
